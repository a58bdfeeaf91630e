"""More than one node: a head and two worker nodes on this machine, each its own `ray start`
process with its own resources, ports and temp dir (token authentication on), with pool,
checkpoint and manifests on the loopback S3 server.

Training runs one Ray Train worker per worker node and the query's scoring actors land on
different nodes: each asks for 2 of a node's 3 CPUs, so no node holds two, and the CPU left on
each feeds them (a read and a decode task). The head has no CPUs and only runs drivers, as on
KubeRay. With the same checkpoint, the three-node query selects exactly what a single-node query
(this process's local Ray) selects.
"""

from __future__ import annotations

import json
import re
import secrets

import pytest
from _python import run_python
from _ray_nodes import ROOT, count_nodes, node_env, port_open, start_node, stop_nodes, wait_for

pytestmark = pytest.mark.ray

# Where a cluster's actors ran, from the GCS's actor table (dead actors included).
PLACEMENT = """
import collections, json, sys, ray
import ray._private.state as state
ray.init(address=sys.argv[1])
where = collections.defaultdict(list)
for actor in state.state.actor_table(None).values():
    where[actor["ActorClassName"]].append(actor["Address"]["NodeID"])
nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
print(json.dumps({"actors": where, "nodes": nodes}))
"""


@pytest.fixture(scope="module")
def cluster():
    env = node_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    nodes = [start_node(env, num_cpus=0)]
    try:
        wait_for(lambda: port_open(nodes[0].gcs), nodes[0], "the head")
        nodes += [start_node(env, head=nodes[0].gcs, num_cpus=3) for _ in range(2)]
        wait_for(lambda: count_nodes(nodes[0].gcs, env) == 3, nodes[1], "three nodes")
        yield {"address": nodes[0].gcs, "env": env}
    finally:
        stop_nodes(nodes)


def driver(cluster, module: str, *overrides: str, timeout: float = 480) -> str:
    """Run `python -m module overrides... address=HEAD` as a user's driver; its stdout."""
    env = {**cluster["env"], "PYTHONPATH": str(ROOT)}
    done = run_python("-m", module, *overrides, f"address={cluster['address']}", env=env, timeout=timeout)
    assert done.returncode == 0, f"{module}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def placement(cluster) -> dict:
    done = run_python("-c", PLACEMENT, cluster["address"], env=cluster["env"], cwd="/tmp", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def storage(s3_server) -> list[str]:
    options = s3_server.storage_options
    return [f"storage_options.{key}={options[key]}" for key in ("endpoint_url", "key", "secret")]


def test_train_and_query_spread_over_nodes_and_select_what_one_node_selects(cluster, s3_server, ray_local) -> None:
    from pipeline.manifest import load
    from pipeline.pools import build_pool, synthetic
    from ray_jobs._shared.querying import QuerySpec, query

    options = s3_server.storage_options
    labeled, unlabeled, root = s3_server.uri("labeled"), s3_server.uri("unlabeled"), s3_server.uri("runs")
    source = dict(seed=1, num_classes=4, image_size=28, channels=1)
    build_pool(synthetic(64, **source), labeled, shard_samples=32, storage_options=options)
    build_pool(
        synthetic(96, split="test", **source), unlabeled, shard_samples=24, unlabeled=True, storage_options=options
    )

    out = driver(
        cluster,
        "ray_jobs.train",
        f"labeled={labeled}",
        "model=small_cnn",
        "epochs=1",
        "batch_size=16",
        "num_workers=2",
        "cpus_per_worker=2",
        f"storage_path={root}/train",
        "name=multinode",
        *storage(s3_server),
    )
    checkpoint = re.search(r"final checkpoint: (\S+)", out).group(1)
    assert checkpoint.startswith("s3://")

    out = driver(
        cluster,
        "ray_jobs.query",
        f"pool={unlabeled}",
        f"checkpoint={checkpoint}",
        "k=12",
        f"out={root}/q-three-nodes",
        "run_id=r1",
        "actors=2",
        "cpus_per_actor=2",
        "batch_size=16",
        "incremental=false",
        *storage(s3_server),
    )
    assert "selected 12" in out, out

    where = placement(cluster)
    workers = [node for name, nodes in where["actors"].items() if "TrainWorker" in name for node in nodes]
    scorers = [node for name, nodes in where["actors"].items() if "QueryScorer" in name for node in nodes]
    cpu_nodes = {node for node, cpus in where["nodes"].items() if cpus > 0}
    assert len(workers) == 2 and set(workers) == cpu_nodes, where  # one training worker per worker node
    assert len(scorers) >= 2 and set(scorers) == cpu_nodes, where  # the scoring actors on both nodes

    single = QuerySpec(
        pool=unlabeled,
        checkpoint=checkpoint,
        k=12,
        out=f"{root}/q-one-node",
        run_id="r1",
        actors=1,
        cpus_per_actor=0.5,
        batch_size=16,
        incremental=False,
        storage_options=options,
    )
    query(single)
    three = load(f"{root}/q-three-nodes/r1", options, columns=["key", "score"]).to_pylist()
    one = load(f"{root}/q-one-node/r1", options, columns=["key", "score"]).to_pylist()
    assert [row["key"] for row in three] == [row["key"] for row in one]
    assert [row["score"] for row in three] == pytest.approx([row["score"] for row in one], rel=1e-5)

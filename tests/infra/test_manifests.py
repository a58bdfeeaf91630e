"""The deployment files under infra/ hold together without a cluster.

Every YAML parses (multi-document, and the RayJob template a ConfigMap carries); each kind has
the fields KubeRay and Kubernetes need; nightly schedules cannot overlap; no credential is
written in a manifest; every ``python -m MODULE`` a manifest runs exists (``--help`` exits 0),
and every ``--config FILE`` it names is in the repository and loads, with the manifest's
overrides, into the job's config class; the image is built from an official Ray GPU image of the
same Ray version the manifests declare, and installs this project.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
EXPECTED_FILES = (
    "raycluster-query.yaml",
    "rayjob-query.yaml",
    "rayjob-train.yaml",
    "rayjob-align.yaml",
    "raycronjob-nightly.yaml",
    "cronjob-nightly.yaml",
)
SECRET_NAME = "lplgrad-s3"
RUN_ID = "2026-11-21"
# What a shell or the CronJob's renderer puts in place of a run id at submission time.
RUN_ID_SOURCES = ("$(date -u +%F)", "__RUN_ID__")
# Job module -> its config class (the dataclass its parse_args loads).
CONFIG_CLASSES = {"ray_jobs.align": "AlignConfig", "ray_jobs.query": "QueryConfig", "ray_jobs.train": "TrainConfig"}
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)


@dataclass(frozen=True)
class Doc:
    """One Kubernetes object: where it came from, and its content."""

    where: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))


def _render(text: str) -> str:
    for source in RUN_ID_SOURCES:
        text = text.replace(source, RUN_ID)
    return text


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> list[Doc]:
    """Every object in infra/, plus the manifests ConfigMaps carry as templates (rendered)."""
    docs = []
    for path in yaml_files():
        where = str(path.relative_to(REPO))
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is None:
                continue
            assert isinstance(body, dict), f"{where} document {i} is not a mapping"
            docs.append(Doc(f"{where}#{body.get('kind')}/{body.get('metadata', {}).get('name')}", body))
            if body.get("kind") == "ConfigMap":
                for name, value in (body.get("data") or {}).items():
                    if name.endswith((".yaml", ".yml")):
                        for embedded in yaml.safe_load_all(_render(value)):
                            docs.append(Doc(f"{where}#ConfigMap/{body['metadata']['name']}/{name}", embedded))
    return docs


DOCS = documents()


def by_kind(*kinds: str) -> list[Doc]:
    return [d for d in DOCS if d.kind in kinds]


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(d.where, d.body["spec"]) for d in by_kind("RayCluster")]
    specs += [
        (d.where, d.body["spec"]["rayClusterSpec"]) for d in by_kind("RayJob") if "rayClusterSpec" in d.body["spec"]
    ]
    specs += [(d.where, d.body["spec"]["jobTemplate"]["rayClusterSpec"]) for d in by_kind("RayCronJob")]
    return specs


def ray_containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for where, spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        found += [(where, c) for g in groups for c in g["template"]["spec"]["containers"]]
    return found


# -- parsing entrypoints -----------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """``python -m MODULE [--config FILE] [key=value ...]`` found in a manifest."""

    where: str
    module: str
    config: str | None
    overrides: tuple[str, ...]


def commands() -> list[tuple[str, str]]:
    """(where, shell text) of everything a manifest runs: entrypoints and container commands."""
    found = []
    for doc in DOCS:
        spec = doc.body.get("spec") or {}
        if doc.kind == "RayJob":
            found.append((doc.where, spec["entrypoint"]))
        if doc.kind == "RayCronJob":
            found.append((doc.where, spec["jobTemplate"]["entrypoint"]))
        for node in walk(doc.body):
            if isinstance(node, dict) and "image" in node and ("command" in node or "args" in node):
                found.append((doc.where, shlex.join([*node.get("command", []), *node.get("args", [])])))
    return found


def invocations() -> list[Invocation]:
    found = []
    for where, text in commands():
        tokens = shlex.split(_render(text))
        for i, token in enumerate(tokens[:-2]):
            if Path(token).name in ("python", "python3") and tokens[i + 1] == "-m":
                rest = []
                for t in tokens[i + 3 :]:
                    if t in (";", "&&", "||", "|"):
                        break
                    rest.append(t)
                config = None
                for j, t in enumerate(rest):
                    if t == "--config":
                        config = rest[j + 1]
                    elif t.startswith("--config="):
                        config = t.split("=", 1)[1]
                overrides = tuple(t for t in rest if "=" in t and not t.startswith("-"))
                found.append(Invocation(where, tokens[i + 2], config, overrides))
    return found


def app_dir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert workdirs, "infra/Dockerfile sets no WORKDIR (where the project and its configs live in the image)"
    return workdirs[-1].rstrip("/")


def repo_path(config: str) -> Path:
    """A config path as the image sees it (absolute under the app dir, or relative) -> the repo file."""
    prefix = app_dir() + "/"
    relative = config[len(prefix) :] if config.startswith(prefix) else config
    assert not Path(relative).is_absolute(), f"--config {config} is outside the image's project dir {prefix}"
    return REPO / relative


# -- files and kinds ---------------------------------------------------------------------------


def test_manifests_exist_and_parse() -> None:
    names = {p.name for p in yaml_files()}
    assert set(EXPECTED_FILES) <= names, f"missing: {set(EXPECTED_FILES) - names}"
    for doc in DOCS:
        body = doc.body
        assert body.get("apiVersion") and body.get("kind"), f"{doc.where}: apiVersion and kind are required"
        assert body.get("metadata", {}).get("name"), f"{doc.where}: metadata.name is required"
    kinds = {d.kind for d in DOCS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds


def check_group(where: str, group: dict[str, Any], what: str) -> None:
    assert isinstance(group.get("rayStartParams"), dict), f"{where}: {what} needs rayStartParams (a mapping)"
    assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
        f"{where}: rayStartParams values must be strings"
    )
    containers = group.get("template", {}).get("spec", {}).get("containers")
    assert containers and all(c.get("image") and c.get("name") for c in containers), (
        f"{where}: {what} needs a pod template"
    )


def check_ray_cluster_spec(where: str, spec: dict[str, Any]) -> None:
    check_group(where, spec["headGroupSpec"], "headGroupSpec")
    groups = spec.get("workerGroupSpecs")
    assert groups, f"{where}: workerGroupSpecs is empty"
    for group in groups:
        assert group.get("groupName"), f"{where}: a worker group has no groupName"
        check_group(where, group, f"worker group {group['groupName']}")
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], (
            f"{where}: worker group {group['groupName']} needs minReplicas <= replicas <= maxReplicas"
        )
        for container in group["template"]["spec"]["containers"]:
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) >= 1, (
                f"{where}: worker group {group['groupName']} has no nvidia.com/gpu limit"
            )
    assert spec.get("rayVersion"), f"{where}: rayVersion is required (it must match the image)"


@pytest.mark.parametrize("doc", by_kind("RayCluster"), ids=lambda d: d.where)
def test_raycluster_autoscales_gpu_workers(doc: Doc) -> None:
    spec = doc.body["spec"]
    check_ray_cluster_spec(doc.where, spec)
    assert spec.get("enableInTreeAutoscaling") is True, f"{doc.where}: enableInTreeAutoscaling must be true"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), f"{doc.where}: nothing to scale"


def check_rayjob_spec(where: str, spec: dict[str, Any]) -> None:
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{where}: entrypoint is required"
    has_cluster, has_selector = "rayClusterSpec" in spec, bool(spec.get("clusterSelector"))
    assert has_cluster != has_selector, f"{where}: exactly one of rayClusterSpec and clusterSelector"
    if has_cluster:
        check_ray_cluster_spec(where, spec["rayClusterSpec"])
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{where}: a RayJob's own cluster must be shut down after it"
        )
        assert spec.get("ttlSecondsAfterFinished", -1) >= 0, f"{where}: ttlSecondsAfterFinished is required"
    else:
        assert spec["clusterSelector"].get("ray.io/cluster"), f"{where}: clusterSelector needs ray.io/cluster"
        assert spec.get("shutdownAfterJobFinishes") is False, f"{where}: never shut down a selected (shared) cluster"
        assert "ttlSecondsAfterFinished" not in spec, f"{where}: KubeRay refuses a TTL without shutdownAfterJobFinishes"
        names = {d.body["metadata"]["name"] for d in by_kind("RayCluster")}
        assert spec["clusterSelector"]["ray.io/cluster"] in names, (
            f"{where}: selects a RayCluster infra/ does not define"
        )
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    downloads = sorted(set(runtime_env) & {"pip", "conda", "uv", "working_dir", "py_modules"})
    assert not downloads, (
        f"{where}: runtimeEnvYAML {downloads} would install or download at run time; bake it into the image"
    )


@pytest.mark.parametrize("doc", by_kind("RayJob"), ids=lambda d: d.where)
def test_rayjob_fields(doc: Doc) -> None:
    check_rayjob_spec(doc.where, doc.body["spec"])
    name = doc.body["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (
        f"{doc.where}: a RayJob name must be a DNS-1035 label of at most 47 characters, got {name!r}"
    )


def period_seconds(schedule: str) -> int | None:
    """Period of simple cron schedules (daily, weekly); None for anything else."""
    fields = schedule.split()
    if len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit() and fields[2] == fields[3] == "*":
        return 86_400 if fields[4] == "*" else 7 * 86_400 if fields[4].isdigit() else None
    return None


def check_no_overlap(where: str, schedule: str, rayjob_spec: dict[str, Any]) -> None:
    period = period_seconds(schedule)
    deadline = rayjob_spec.get("activeDeadlineSeconds")
    assert period is not None and deadline is not None and 0 < deadline < period, (
        f"{where}: the RayJob's activeDeadlineSeconds ({deadline}) must be shorter than the schedule's "
        f"period ({period} s), or one run can overlap the next"
    )


@pytest.mark.parametrize("doc", by_kind("RayCronJob"), ids=lambda d: d.where)
def test_raycronjob_fields_and_no_overlap(doc: Doc) -> None:
    spec = doc.body["spec"]
    assert isinstance(spec.get("schedule"), str) and len(spec["schedule"].split()) == 5, f"{doc.where}: schedule"
    check_rayjob_spec(doc.where, spec["jobTemplate"])
    # No concurrencyPolicy in the KubeRay 1.6/1.7 RayCronJob API: the deadline forbids overlap.
    if "concurrencyPolicy" in spec:
        assert spec["concurrencyPolicy"] == "Forbid", f"{doc.where}: concurrencyPolicy must be Forbid"
    check_no_overlap(doc.where, spec["schedule"], spec["jobTemplate"])
    assert "RayCronJob=true" in (INFRA / "k8s" / "raycronjob-nightly.yaml").read_text(), "state the feature gate"


@pytest.mark.parametrize("doc", by_kind("CronJob"), ids=lambda d: d.where)
def test_cronjob_forbids_concurrency_and_submits_a_dated_rayjob(doc: Doc) -> None:
    spec = doc.body["spec"]
    assert isinstance(spec.get("schedule"), str) and len(spec["schedule"].split()) == 5, f"{doc.where}: schedule"
    assert spec.get("concurrencyPolicy") == "Forbid", f"{doc.where}: concurrencyPolicy must be Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure")
    source = doc.where.split("#")[0]
    templates = [d for d in DOCS if d.where.startswith(f"{source}#ConfigMap/") and d.kind == "RayJob"]
    assert len(templates) == 1, f"{doc.where}: expected one RayJob template in a ConfigMap of {source}"
    rayjob = templates[0].body
    check_no_overlap(doc.where, spec["schedule"], rayjob["spec"])
    # The night's date names the RayJob (a second trigger the same night changes nothing) and the run.
    assert RUN_ID in rayjob["metadata"]["name"] and f"run_id={RUN_ID}" in rayjob["spec"]["entrypoint"]
    mounted = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    assert templates[0].where.split("#ConfigMap/")[1].split("/")[0] in mounted, (
        f"{doc.where}: the pod does not mount the template ConfigMap"
    )
    # Its service account may create RayJobs.
    account = pod.get("serviceAccountName")
    bindings = [b for b in by_kind("RoleBinding") if any(s.get("name") == account for s in b.body["subjects"])]
    roles = {b.body["roleRef"]["name"] for b in bindings}
    rules = [r for role in by_kind("Role") if role.body["metadata"]["name"] in roles for r in role.body["rules"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules), (
        f"{doc.where}: service account {account!r} is not bound to a Role that can create rayjobs"
    )


def service_account_names(body: Any) -> set[str]:
    """Every serviceAccountName a document's pods run as (pod templates anywhere inside it)."""
    return {
        node["serviceAccountName"] for node in walk(body) if isinstance(node, dict) and "serviceAccountName" in node
    }


def test_pods_run_as_service_accounts_infra_defines() -> None:
    defined = {d.body["metadata"]["name"] for d in by_kind("ServiceAccount")}
    for doc in DOCS:
        missing = sorted(service_account_names(doc.body) - defined)
        assert not missing, f"{doc.where}: runs as service account(s) {missing} that infra/ does not define"


@pytest.mark.parametrize("doc", by_kind("ServiceAccount"), ids=lambda d: d.where)
def test_service_accounts_are_used_and_bound_to_a_defined_role(doc: Doc) -> None:
    name = doc.body["metadata"]["name"]
    assert any(name in service_account_names(d.body) for d in DOCS), (
        f"{doc.where}: no pod runs as service account {name!r} (use it, or drop it)"
    )
    bindings = [
        b
        for b in by_kind("RoleBinding")
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == name for s in b.body.get("subjects") or [])
    ]
    assert bindings, f"{doc.where}: service account {name!r} is bound to no Role"
    roles = {r.body["metadata"]["name"] for r in by_kind("Role")}
    for binding in bindings:
        ref = binding.body["roleRef"]
        assert ref.get("kind") == "Role" and ref.get("name") in roles, (
            f"{binding.where}: binds {name!r} to {ref.get('kind')} {ref.get('name')!r}, which infra/ does not define"
        )


def test_every_kind_is_checked() -> None:
    checked = {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    unknown = sorted({d.kind for d in DOCS} - checked)
    assert not unknown, f"kinds without checks in this test: {unknown}; add them"


def test_nightly_runs_are_dated() -> None:
    nightly = [i for i in invocations() if any(k in i.where for k in ("RayCronJob/", "ConfigMap/"))]
    assert len(nightly) == 2
    for invocation in nightly:
        assert invocation.module == "ray_jobs.query"
        assert f"run_id={RUN_ID}" in invocation.overrides, f"{invocation.where}: the run id must come from the date"


# -- credentials -------------------------------------------------------------------------------


def test_no_literal_secrets() -> None:
    for doc in DOCS:
        assert doc.kind != "Secret", (
            f"{doc.where}: do not commit Secrets; create them with kubectl (docs/operations.md)"
        )
        for node in walk(doc.body):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and SECRET_ENV.search(node["name"]):
                assert "value" not in node, (
                    f"{doc.where}: {node['name']} has a literal value; use the Secret {SECRET_NAME}"
                )
    for path in [*yaml_files(), DOCKERFILE]:
        text = path.read_text()
        assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S", text), f"{path}: a literal secret"
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{path}: looks like an AWS access key id"


def test_ray_pods_read_object_storage_credentials_from_the_secret() -> None:
    containers = ray_containers()
    assert containers
    for where, container in containers:
        from_secret = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
        keyed = {
            e["name"]
            for e in container.get("env", [])
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET_NAME
        }
        assert (
            SECRET_NAME in from_secret or {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= keyed
        ), f"{where}: container {container['name']} does not take its credentials from the Secret {SECRET_NAME}"


# -- entrypoints and configs -------------------------------------------------------------------


def test_entrypoint_modules_exist(monkeypatch, capsys) -> None:
    modules = sorted({i.module for i in invocations()})
    assert {"ray_jobs.query", "ray_jobs.train"} <= set(modules)
    # What `python -m MODULE --help` runs, in this process: a fresh interpreter per module would
    # import torch and Ray again for each (tests/ray_jobs/test_cli_errors.py spawns one).
    for module in modules:
        monkeypatch.setattr(sys, "argv", [module, "--help"])
        with pytest.raises(SystemExit) as exited:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        out, err = capsys.readouterr()
        assert exited.value.code == 0, f"python -m {module} --help failed:\n{err}"
        assert "usage" in out.lower(), f"python -m {module} --help printed no usage:\n{out}"


@pytest.mark.parametrize("invocation", invocations(), ids=lambda i: f"{i.where}:{i.module}")
def test_entrypoint_config_exists_and_loads(invocation: Invocation) -> None:
    assert invocation.module in CONFIG_CLASSES, (
        f"{invocation.where}: add {invocation.module}'s config class to this test"
    )
    assert invocation.config, f"{invocation.where}: name a config file (--config configs/...)"
    path = repo_path(invocation.config)
    assert path.is_file(), f"{invocation.where}: --config {invocation.config} is not in the repository ({path})"
    module = __import__(invocation.module, fromlist=[CONFIG_CLASSES[invocation.module]])
    config = load_config(getattr(module, CONFIG_CLASSES[invocation.module]), path, invocation.overrides)
    if invocation.module == "ray_jobs.query":
        assert config.run_id, f"{invocation.where}: pass run_id=... so a re-run is a no-op, not a new run"


@pytest.mark.parametrize("name", ["nightly", "local"])
def test_query_configs_load_as_they_are(name: str) -> None:
    from ray_jobs.query import QueryConfig

    config = load_config(QueryConfig, REPO / "configs" / "query" / f"{name}.yaml")
    assert config.storage_options == {}, "credentials come from the environment, never from a config"
    if name == "nightly":
        assert (
            config.out.startswith("s3://") and config.pool.startswith("s3://") and config.checkpoint.startswith("s3://")
        )
        assert config.gpus_per_actor == 1 and config.out in config.exclude_manifests
    else:
        assert not any("://" in p for p in (config.pool, config.checkpoint, config.out))
        assert config.out.startswith("runs/")


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_builds_from_ray_and_installs_the_project() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"infra/Dockerfile must build FROM an official Ray GPU image, got {base}"
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == match.group(1), (
            f"{where}: rayVersion {spec['rayVersion']} != image Ray {match.group(1)}"
        )
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), "the image must `pip install .` the project"
    assert re.search(r"torch==", text) and re.search(r"torchvision==", text), "pin torch and torchvision"
    for directory in ("pipeline", "ray_jobs", "configs"):
        assert re.search(rf"^COPY .*\b{directory}\b", text, re.MULTILINE), f"the image must contain {directory}/"
    images = {c["image"] for _, c in ray_containers()}
    assert len(images) == 1, f"Ray pods use different images: {sorted(images)}"

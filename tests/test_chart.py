"""The Helm chart (charts/instseg): lint, render, validate the rendered objects offline and on
the real API server (server-side dry-run), and check them against the operator's code: its
RBAC, its flags, its metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from instseg_operator import __main__ as operator_cli
from instseg_operator import manifests
from instseg_operator.cluster import API_USE
from instseg_operator.metrics import TrainingMetrics
from tests.cluster import KubeEnvironment, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "instseg"
KUBE_VERSION = "1.34.0"
NAMESPACE = "instseg-system"
WATCHED = ["team-a", "team-b"]
# every optional part on, and a namespace list instead of all namespaces
EVERYTHING = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "alerts": {"enabled": True, "labels": {"release": "prom"}},
    "dashboard": {"enabled": True, "namespace": "monitoring"},
    "watchNamespaces": WATCHED,
    "peering": {"priority": 100},
    "imagePullSecrets": [{"name": "ghcr-pull"}],
    "podAnnotations": {"example.com/team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "KOPF_EXTRA", "value": "1"}],
}


def _helm() -> str:
    found = shutil.which("helm") or ROOT / ".tools" / "bin" / "helm"
    if not Path(found).is_file():
        pytest.skip("helm not found on PATH or in .tools/bin; `make tools` fetches it")
    return str(found)


def _run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=60)


@cache
def _render(values_json: str, include_crds: bool) -> tuple[dict, ...]:
    args = ["template", "instseg", str(CHART), "--namespace", NAMESPACE, "--values", "-"]
    args += ["--include-crds"] if include_crds else []
    done = subprocess.run(
        [_helm(), *args], input=values_json, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(values: dict | None = None, include_crds: bool = False) -> list[dict]:
    return list(_render(json.dumps(values or {}), include_crds))


def find(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = find(objects, kind)
    return found


def container(objects: list[dict]) -> dict:
    (operator,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def env(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"]}


# ------------------------------------------------------------------------ lint and files


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_helm_lint_strict(values, tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    done = _run_helm("lint", "--strict", str(CHART), "--values", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_crds_are_the_top_level_crds():
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == top
    for name in top:
        same = (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes()
        assert same, f"charts/instseg/crds/{name} differs from crds/{name}; copy it again"


def test_every_top_level_value_is_documented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line.split(":")[0]
        for before, line in zip(lines, lines[1:])
        if re.match(r"^[A-Za-z]\w*:", line) and not before.startswith("#")
    ]
    assert undocumented == []


# ------------------------------------------------------------------------ rendered objects


def _kinds(objects: list[dict]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def test_default_render():
    assert _kinds(render(include_crds=True)) == [
        ("ClusterKopfPeering", "instseg"),
        ("ClusterRole", "instseg"),
        ("ClusterRole", "instseg-edit"),
        ("ClusterRole", "instseg-view"),
        ("ClusterRoleBinding", "instseg"),
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "instancesegtrainings.instseg.io"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("Deployment", "instseg"),
        ("Service", "instseg-metrics"),
        ("ServiceAccount", "instseg"),
    ]


def test_everything_on_render():
    objects = render(EVERYTHING, include_crds=True)
    kinds = _kinds(objects)
    assert ("ServiceMonitor", "instseg") in kinds
    assert ("ConfigMap", "instseg-dashboard") in kinds
    assert ("PrometheusRule", "instseg") in kinds
    assert ("ClusterKopfPeering", "instseg") not in kinds
    peerings = find(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == WATCHED
    assert {p["metadata"]["name"] for p in peerings} == {"instseg"}


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_rendered_objects_are_valid_kubernetes(values, kube: KubeEnvironment):
    objects = render(values, include_crds=True)
    served = []
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # the Prometheus Operator's CRD is not installed
            _check_service_monitor(obj, render(values))
            continue
        if obj["kind"] == "PrometheusRule":  # its rules are evaluated by test_operator_e2e
            assert obj["metadata"]["labels"]["release"] == "prom"
            assert {r["alert"] for r in obj["spec"]["groups"][0]["rules"]} == {
                "InstsegTrainingFailed",
                "InstsegTrainingStalled",
                "InstsegOperatorDown",
            }
            continue
        if obj["apiVersion"].startswith("kopf.dev/"):  # custom resources: the server checks
            served.append(obj)
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        served.append(obj)
    # the real API server: every schema (the peering objects' against kopf's CRDs), field
    # validation and admission
    namespaces = {o["metadata"].get("namespace") for o in served} - {None}
    for ns in namespaces:
        kube.kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    text = yaml.safe_dump_all(served)
    kube.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", "-",
                 stdin=text)  # fmt: skip


def _check_service_monitor(monitor: dict, objects: list[dict]) -> None:
    """The parts of monitoring.coreos.com/v1 ServiceMonitor that make it scrape our Service."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    # the series' own namespace label survives the scrape (else it becomes exported_namespace)
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    service = one(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_a_namespace_glob_with_peering_is_refused(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"watchNamespaces": ["team-*"]}))
    done = _run_helm("template", "instseg", str(CHART), "--values", str(path))
    assert done.returncode != 0
    assert '"team-*" is a glob' in done.stderr
    assert "peering.enabled=false" in done.stderr


def test_a_mistyped_value_is_refused_not_ignored():
    done = _run_helm(
        "template", "instseg", str(CHART), "--set", "metrics.servicemonitor.enabled=true"
    )
    assert done.returncode != 0
    assert "additional properties 'servicemonitor' not allowed" in done.stderr


def test_the_values_schema_refuses_unknown_keys_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def open_objects(node: dict, path: str) -> list[str]:
        found = []
        if "properties" in node and node.get("additionalProperties") is not False:
            found.append(path or "/")
        for key, child in (node.get("properties") or {}).items():
            found += open_objects(child, f"{path}/{key}")
        if isinstance(node.get("items"), dict):
            found += open_objects(node["items"], f"{path}[]")
        return found

    assert open_objects(schema, "") == []


@pytest.mark.parametrize("version, accepted", [("1.28.9", False), ("1.29.0", True)])
def test_the_chart_needs_kubernetes_1_29(version, accepted):
    # the trainer's Job sets podReplacementPolicy, which Kubernetes serves from 1.29
    done = _run_helm("template", "instseg", str(CHART), "--kube-version", version)
    assert (done.returncode == 0) == accepted, done.stderr
    if not accepted:
        assert "incompatible with Kubernetes" in done.stderr


def test_a_bad_log_level_is_refused_by_the_values_schema(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"logLevel": "verbose"}))
    done = _run_helm("template", "instseg", str(CHART), "--values", str(path))
    assert done.returncode != 0
    assert "value must be one of 'debug', 'info', 'warning'" in done.stderr


# ------------------------------------------------------------------------ the Deployment


def test_deployment_runs_one_hardened_operator():
    objects = render()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(objects)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = operator["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= operator["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= operator["resources"]["limits"].keys()
    tmp = next(m for m in operator["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert operator["image"] == "ghcr.io/instseg/operator:0.1.0"
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_liveness_probe_asks_kopfs_endpoint():
    objects = render({"livenessProbe": {"port": 9090}})
    operator = container(objects)
    probe = operator["livenessProbe"]["httpGet"]
    port = next(p for p in operator["ports"] if p["name"] == probe["port"])
    assert env(objects)["INSTSEG_LIVENESS"] == f"http://0.0.0.0:{port['containerPort']}/healthz"
    assert port["containerPort"] == 9090
    assert probe["path"] == "/healthz"


def _kopf_command(objects: list[dict], monkeypatch) -> list[str]:
    """The `kopf run` command line the operator builds from the rendered environment."""
    for name in [n for n in os.environ if n.startswith("INSTSEG_")]:
        monkeypatch.delenv(name)
    for name, value in env(objects).items():
        monkeypatch.setenv(name, value)
    return operator_cli.kopf_argv(operator_cli._args([]))


def test_defaults_serve_all_namespaces_with_cluster_peering(monkeypatch):
    objects = render()
    command = _kopf_command(objects, monkeypatch)
    assert "--all-namespaces" in command
    assert "--peering=instseg" in command
    assert "--liveness=http://0.0.0.0:8080/healthz" in command
    assert "--log-format=json" in command
    assert "--debug" not in command and "--quiet" not in command
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "instseg"
    assert env(objects)["INSTSEG_TRAINER_IMAGE"] == manifests.DEFAULT_IMAGE


def test_values_reach_the_operator_command(monkeypatch):
    values = {**EVERYTHING, "logFormat": "json", "logLevel": "debug"}
    values["trainer"] = {"image": {"repository": "registry.example/trainer", "tag": "dev"}}
    objects = render(values)
    command = _kopf_command(objects, monkeypatch)
    assert [a for a in command if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--log-format=json" in command and "--debug" in command
    assert env(objects)["INSTSEG_PEERING_PRIORITY"] == "100"
    assert env(objects)["INSTSEG_TRAINER_IMAGE"] == "registry.example/trainer:dev"
    assert env(objects)["KOPF_EXTRA"] == "1"


@pytest.mark.parametrize("log_format", ["plain", "full"])
def test_text_logs_are_a_value_away_from_the_default_json(monkeypatch, log_format):
    assert "--log-format=json" in _kopf_command(render(), monkeypatch)
    command = _kopf_command(render({"logFormat": log_format}), monkeypatch)
    assert f"--log-format={log_format}" in command and "--log-format=json" not in command


def test_an_unknown_log_format_is_refused_by_the_values_schema(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"logFormat": "xml"}))
    done = _run_helm("template", "instseg", str(CHART), "--values", str(path))
    assert done.returncode != 0
    assert "value must be one of 'plain', 'full', 'json'" in done.stderr


def test_peering_off_runs_standalone_without_peering_objects(monkeypatch):
    objects = render({"peering": {"enabled": False}, "watchNamespaces": ["team-*"]})
    assert "--standalone" in _kopf_command(objects, monkeypatch)
    assert not find(objects, "KopfPeering") and not find(objects, "ClusterKopfPeering")


def test_metrics_service_reaches_the_metrics_port():
    objects = render({"metrics": {"port": 9100}})
    service, operator = one(objects, "Service"), container(objects)
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    target = next(p for p in operator["ports"] if p["name"] == port["targetPort"])
    assert target["containerPort"] == 9100 == int(env(objects)["INSTSEG_METRICS_PORT"])


# ------------------------------------------------------------------------ RBAC

# What kopf itself calls, beside the handlers' API_USE (kopf 1.45.2 source:
# _core/reactor/observation.py, _core/engines/peering.py)
KOPF_DISCOVERY = {
    # resource_observer: scans and watches CRDs to serve the trainings' when they appear
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# namespace_observer: with a namespace list (not -A), kopf lists and watches namespaces
KOPF_NAMESPACE_LIST = {("", "namespaces"): {"list", "watch"}}
# peering: kopf watches its peering object and patches its own entry into its status
KOPF_PEERING = {"list", "watch", "patch"}


def operator_role(objects: list[dict]) -> dict:
    """The ClusterRole bound to the operator (the others are for the people who train)."""
    bound = one(objects, "ClusterRoleBinding")["roleRef"]["name"]
    (role,) = [o for o in find(objects, "ClusterRole") if o["metadata"]["name"] == bound]
    return role


def _granted(role: dict) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


# what the operator needs cluster-wide even when it serves a list of namespaces
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("kopf.dev", "clusterkopfpeerings"),
}


def _needed(namespaces: list[str], peering: bool) -> dict[tuple[str, str], set[str]]:
    needed = {key: set(verbs) for key, verbs in API_USE.items()}
    extra = dict(KOPF_DISCOVERY)
    if namespaces:
        extra.update(KOPF_NAMESPACE_LIST)
    if peering:
        extra[("kopf.dev", "kopfpeerings" if namespaces else "clusterkopfpeerings")] = KOPF_PEERING
    # RBAC lets the operator create the trainers' Roles only if it holds what they grant
    training = {"metadata": {"name": "t", "namespace": "ns", "uid": "u"}, "spec": {}}
    for rule in manifests.build_role(training)["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                extra.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in extra.items():
        needed.setdefault(key, set()).update(verbs)
    return needed


@pytest.mark.parametrize(
    "namespaces, peering",
    [([], True), (WATCHED, True), ([], False), (WATCHED, False)],
    ids=["all-namespaces", "namespace-list", "standalone", "namespace-list-standalone"],
)
def test_cluster_role_grants_exactly_what_the_operator_uses(namespaces, peering):
    objects = render({"watchNamespaces": namespaces, "peering": {"enabled": peering}})
    needed = _needed(namespaces, peering)
    if not namespaces:
        assert _granted(operator_role(objects)) == needed
        assert not find(objects, "Role") and not find(objects, "RoleBinding")
        return
    # a namespace list: only what is cluster-wide in the ClusterRole, the rest in a Role
    # bound to the operator in each watched namespace
    cluster_wide = {k: v for k, v in needed.items() if k in CLUSTER_SCOPED}
    assert _granted(operator_role(objects)) == cluster_wide
    roles = {r["metadata"]["namespace"]: r for r in find(objects, "Role")}
    assert sorted(roles) == sorted(namespaces)
    namespaced = {k: v for k, v in needed.items() if k not in CLUSTER_SCOPED}
    for role in roles.values():
        assert _granted(role) == namespaced
    account = one(objects, "ClusterRoleBinding")["subjects"]
    for binding in find(objects, "RoleBinding"):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[binding["metadata"]["namespace"]]["metadata"]["name"],
        }
        assert binding["subjects"] == account


def test_cluster_role_is_bound_to_the_operators_service_account():
    objects = render()
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == operator_role(objects)["metadata"]["name"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]


def test_namespace_editors_may_train_and_viewers_may_read(kube: KubeEnvironment) -> None:
    # the chart's aggregated ClusterRoles, folded into edit and view by the real
    # clusterrole-aggregation controller
    ns = "team-rbac"
    binding = lambda user, role: {  # noqa: E731
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": f"{user}-{role}", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }  # fmt: skip
    kube.kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kube.kubectl.apply(binding("alice", "edit"), binding("bob", "view"))

    def can(user: str, verb: str) -> bool:
        answer = kube.kubectl("auth", "can-i", verb, "instancesegtrainings.instseg.io", "-n", ns,
                              f"--as={user}", check=False)  # fmt: skip
        return answer.strip().splitlines()[0] == "yes"

    wait_for("edit to include trainings", lambda: can("alice", "create"), timeout=30)
    assert can("alice", "delete") and can("bob", "list")
    wait_for("view to include trainings", lambda: can("bob", "get"), timeout=30)
    assert not can("bob", "create") and not can("bob", "delete")


# ------------------------------------------------------------------------ the dashboard


def _exported_series() -> set[str]:
    """Every series name the operator exposes, with a training in every state."""
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.count_created("MaskRCNN-ResNet50")
    metrics.count_transition("MaskRCNN-ResNet50", "Succeeded")
    metrics.count_transition("MaskRCNN-ResNet50", "Failed")
    progress = {"epoch": 2, "totalEpochs": 4, "loss": 1.0, "learningRate": 0.01}
    progress.update(imagesPerSecond=9.0, etaSeconds=60)
    progress["metrics"] = {"segmMap": 0.3, "bboxMap": 0.4, "bestSegmMap": 0.3, "bestBboxMap": 0.4}
    metrics.observe(
        {
            "metadata": {"namespace": "ns", "name": "t"},
            "spec": {"template": "MaskRCNN-ResNet50"},
            "status": {"phase": "Running", "progress": progress},
        }
    )
    with metrics.reconcile_seconds.time():
        pass
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def _dashboard() -> tuple[dict, dict]:
    config_map = one(render({"dashboard": {"enabled": True}}), "ConfigMap")
    (text,) = config_map["data"].values()
    return config_map, json.loads(text)


def test_dashboard_config_map_is_found_by_grafana():
    config_map, dashboard = _dashboard()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "training"} <= variables
    assert dashboard == json.loads((CHART / "dashboards" / "instseg.json").read_text())


def test_dashboard_plots_only_series_the_operator_exports():
    _, dashboard = _dashboard()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in re.findall(r"\binstseg_\w+", expr)}
    assert used - _exported_series() == set()
    # trainings by phase, progress, loss, learning rate, images/s and validation mAP
    assert {
        "instseg_trainings",
        "instseg_training_progress_ratio",
        "instseg_training_loss",
        "instseg_training_learning_rate",
        "instseg_training_images_per_second",
        "instseg_training_segm_map",
    } <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

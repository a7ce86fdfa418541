"""The Kubernetes API emulator (tests/kube) behaves like a real API server for kubectl and
the kubernetes Python client: the semantics listed in /work/shared/KUBE-TESTING.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes import watch as k8s_watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from tests.kube.emulator import Emulator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "instancesegtrainings.yaml"
GROUP, VERSION, PLURAL = "instseg.io", "v1alpha1", "instancesegtrainings"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory):
    with Emulator(tmp_path_factory.mktemp("kube"), controllers=False) as running:
        running.apply_crd_file(CRD_FILE)
        yield running


@pytest.fixture(scope="module")
def api(emulator: Emulator) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(emulator.kubeconfig))


@pytest.fixture
def namespace(api: k8s.ApiClient) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def training(name: str, **spec) -> dict:
    body = {
        "template": "MaskRCNN-ResNet50",
        "data": {"train": {"claimName": "datasets"}, "val": {"claimName": "datasets"}},
        "output": {"claimName": "runs"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InstanceSegTraining",
        "metadata": {"name": name},
        "spec": body,
    }


def create_training(api: k8s.ApiClient, namespace: str, name: str, **spec) -> dict:
    return k8s.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, training(name, **spec)
    )


def client_for_token(emulator: Emulator, token: str) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = emulator.url
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return k8s.ApiClient(configuration)


# kubectl --------------------------------------------------------------------------------------
@pytest.fixture
def kubectl(emulator: Emulator, tmp_path: Path):
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    env = dict(os.environ, KUBECACHEDIR=str(tmp_path / "kubecache"))

    def run(*args: str, stdin: str | None = None, check: bool = True):
        result = subprocess.run(
            [KUBECTL, "--kubeconfig", str(emulator.kubeconfig), *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=60,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run


def test_kubectl_applies_gets_and_deletes_a_training(kubectl, namespace: str) -> None:
    example = REPO / "examples" / "training.yaml"
    created = kubectl("apply", "--validate=false", "-n", namespace, "-f", str(example))
    assert "created" in created.stdout

    table = kubectl("get", "ist", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "TEMPLATE", "PHASE", "EPOCH", "BEST", "MAP", "AGE"]
    assert table[1].split()[:2] == ["shapes-r50", "MaskRCNN-ResNet50"]
    wide = kubectl("get", "instseg", "-n", namespace, "-o", "wide").stdout
    assert "WORKERS" in wide.splitlines()[0]

    jsonpath = "{.items[0].spec.workers} {.items[0].metadata.generation}"
    assert kubectl("get", "ist", "-n", namespace, "-o", f"jsonpath={jsonpath}").stdout == "1 1"

    changed = yaml.safe_load(example.read_text())
    changed["spec"]["hyperparameters"]["epochs"] = 30
    updated = kubectl("apply", "--validate=false", "-n", namespace, "-f", "-",
                      stdin=yaml.safe_dump(changed))  # fmt: skip
    assert "configured" in updated.stdout
    obj = json.loads(kubectl("get", "ist", "shapes-r50", "-n", namespace, "-o", "json").stdout)
    assert obj["spec"]["hyperparameters"]["epochs"] == 30
    assert obj["metadata"]["generation"] == 2

    changed["metadata"]["name"] = "broken"
    changed["spec"]["workers"] = 0
    rejected = kubectl("apply", "--validate=false", "-n", namespace, "-f", "-",
                       stdin=yaml.safe_dump(changed), check=False)  # fmt: skip
    assert rejected.returncode != 0
    assert 'The InstanceSegTraining "broken" is invalid' in rejected.stderr
    assert "spec.workers" in rejected.stderr

    deleted = kubectl("delete", "ist", "shapes-r50", "-n", namespace)
    assert "deleted" in deleted.stdout
    missing = kubectl("get", "ist", "shapes-r50", "-n", namespace, check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_kubectl_lists_namespaces_and_events(kubectl, api: k8s.ApiClient, namespace: str) -> None:
    assert "kube-system" in kubectl("get", "namespaces").stdout
    k8s.CoreV1Api(api).create_namespaced_event(
        namespace,
        {
            "metadata": {"generateName": "x-"},
            "involvedObject": {"kind": "Pod", "name": "x", "namespace": namespace},
            "reason": "Tested",
            "message": "hello from the test",
            "type": "Normal",
        },
    )
    events = kubectl("get", "events", "-n", namespace).stdout
    assert "Tested" in events and "hello from the test" in events


# metadata and updates -------------------------------------------------------------------------
def test_server_sets_metadata_and_generate_name(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    first = core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "cm-"}})
    second = core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "cm-"}})
    assert first.metadata.name.startswith("cm-") and len(first.metadata.name) == 8
    assert first.metadata.name != second.metadata.name
    assert first.metadata.uid and first.metadata.creation_timestamp
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)


def test_stale_resource_version_is_a_conflict(api: k8s.ApiClient, namespace: str) -> None:
    custom = k8s.CustomObjectsApi(api)
    obj = create_training(api, namespace, "x")
    obj["spec"]["workers"] = 2
    custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "x", obj)
    with pytest.raises(ApiException) as error:
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "x", obj)
    assert error.value.status == 409
    assert json.loads(error.value.body)["reason"] == "Conflict"


def test_generation_only_follows_the_spec(api: k8s.ApiClient, namespace: str) -> None:
    custom = k8s.CustomObjectsApi(api)
    create_training(api, namespace, "x")
    labelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "x", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "x", {"status": {"phase": "Pending"}}
    )
    assert status["metadata"]["generation"] == 1
    changed = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "x", {"spec": {"workers": 3}}
    )
    assert changed["metadata"]["generation"] == 2


def test_status_subresource_isolation(api: k8s.ApiClient, namespace: str) -> None:
    custom = k8s.CustomObjectsApi(api)
    create_training(api, namespace, "x")
    main = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "x", {"status": {"phase": "Running"}}
    )
    assert "status" not in main
    status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "x",
        {"spec": {"workers": 5}, "status": {"phase": "Running"}},
    )  # fmt: skip
    assert status["status"]["phase"] == "Running"
    assert status["spec"]["workers"] == 1


def test_unknown_fields_are_pruned_and_invalid_values_rejected(
    api: k8s.ApiClient, namespace: str
) -> None:
    custom = k8s.CustomObjectsApi(api)
    create_training(api, namespace, "x")
    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "x",
        {"status": {"phase": "Running", "notInSchema": 1}},
    )  # fmt: skip
    assert patched["status"] == {"phase": "Running"}
    with pytest.raises(ApiException) as error:
        create_training(api, namespace, "bad", workers=0)
    assert error.value.status == 422
    body = json.loads(error.value.body)
    assert body["reason"] == "Invalid"
    assert [cause["field"] for cause in body["details"]["causes"]] == ["spec.workers"]


def test_merge_and_json_patch(api: k8s.ApiClient, namespace: str) -> None:
    custom = k8s.CustomObjectsApi(api)
    obj = create_training(api, namespace, "x", hyperparameters={"epochs": 3, "seed": 1})
    merged = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "x", {"spec": {"hyperparameters": {"seed": None}}}
    )
    assert merged["spec"]["hyperparameters"] == {"epochs": 3}
    rv = merged["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/hyperparameters/epochs", "value": 7},
        {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}},
    ]
    # client 37 sends merge-patch+json for custom objects unless told otherwise
    json_patch = {"_content_type": "application/json-patch+json"}
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "x", ops, **json_patch
    )
    assert patched["spec"]["hyperparameters"]["epochs"] == 7
    assert patched["metadata"]["labels"] == {"k": "v"}
    with pytest.raises(ApiException) as error:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "x", ops, **json_patch
        )
    assert error.value.status == 422
    stale = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}}
    with pytest.raises(ApiException) as error:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "x", stale)
    assert error.value.status == 409


def test_label_selectors(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})]:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": name, "labels": labels}})

    def names(selector: str) -> list[str]:
        found = core.list_namespaced_config_map(namespace, label_selector=selector)
        return sorted(item.metadata.name for item in found.items)

    assert names("app=x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app in (x, y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names("tier") == ["a"]
    assert names("!app") == ["c"]
    assert names("app=x,tier=2") == []
    by_field = core.list_namespaced_config_map(namespace, field_selector="metadata.name=b")
    assert [item.metadata.name for item in by_field.items] == ["b"]


def test_watch_from_a_resource_version(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}})
    listed = core.list_namespaced_config_map(namespace)
    events: list[tuple[str, str]] = []

    def watch() -> None:
        stream = k8s_watch.Watch().stream(
            core.list_namespaced_config_map,
            namespace,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=30,  # the loop ends at DELETED
        )
        for event in stream:
            events.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                break

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}})
    core.patch_namespaced_config_map("after", namespace, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("after", namespace)
    watcher.join(timeout=10)
    assert events == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]


# deletion ---------------------------------------------------------------------------------------
def test_finalizers_block_deletion_until_removed(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "x", "finalizers": ["example.com/keep"]}}
    )
    core.delete_namespaced_config_map("x", namespace)
    kept = core.read_namespaced_config_map("x", namespace)
    assert kept.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("x", namespace, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as error:
        core.read_namespaced_config_map("x", namespace)
    assert error.value.status == 404


def _owned(core: k8s.CoreV1Api, namespace: str, owner, name: str, **extra) -> None:
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name,
                 "uid": owner.metadata.uid, **extra}  # fmt: skip
    metadata = {"name": name, "ownerReferences": [reference]}
    core.create_namespaced_config_map(namespace, {"metadata": metadata})


def _names(core: k8s.CoreV1Api, namespace: str) -> list[str]:
    items = core.list_namespaced_config_map(namespace).items
    return sorted(item.metadata.name for item in items if item.metadata.name != "kube-root-ca")


def test_owner_garbage_collection(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    _owned(core, namespace, owner, "child")
    child = core.read_namespaced_config_map("child", namespace)
    _owned(core, namespace, child, "grandchild")
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    assert _names(core, namespace) == []

    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    _owned(core, namespace, owner, "orphan")
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Orphan")
    assert _names(core, namespace) == ["orphan"]
    assert core.read_namespaced_config_map("orphan", namespace).metadata.owner_references is None

    # created after its owner is gone (a controller racing a deletion): collected too
    gone = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.delete_namespaced_config_map("orphan", namespace)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "late", "ownerReferences": [gone]}}
    )
    assert _names(core, namespace) == []


def test_foreground_deletion_waits_for_blocking_dependents(
    api: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner.metadata.uid, "blockOwnerDeletion": True}  # fmt: skip
    core.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "dep", "ownerReferences": [reference],
                      "finalizers": ["example.com/slow"]}},
    )  # fmt: skip
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")
    waiting = core.read_namespaced_config_map("owner", namespace)
    assert "foregroundDeletion" in waiting.metadata.finalizers
    assert core.read_namespaced_config_map("dep", namespace).metadata.deletion_timestamp
    core.patch_namespaced_config_map("dep", namespace, {"metadata": {"finalizers": None}})
    assert _names(core, namespace) == []


def test_missing_namespace_and_object_are_not_found(api: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    with pytest.raises(ApiException) as error:
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert error.value.status == 404
    assert json.loads(error.value.body)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(ApiException) as error:
        core.read_namespaced_config_map("x", "default")
    assert json.loads(error.value.body)["message"] == 'configmaps "x" not found'


def test_events_are_served_by_core_and_events_k8s_io(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    involved = {"kind": "InstanceSegTraining", "name": "x", "namespace": namespace, "uid": "u1"}
    core.create_namespaced_event(
        namespace,
        {"metadata": {"generateName": "x."}, "involvedObject": involved, "reason": "Started",
         "message": "job created", "type": "Normal", "source": {"component": "kopf"}},
    )  # fmt: skip
    selected = core.list_namespaced_event(namespace, field_selector="involvedObject.name=x")
    assert [event.reason for event in selected.items] == ["Started"]
    assert core.list_namespaced_event(namespace, field_selector="involvedObject.name=y").items == []
    views = k8s.EventsV1Api(api).list_namespaced_event(namespace)
    assert [(e.regarding.name, e.note, e.reporting_controller) for e in views.items] == [
        ("x", "job created", "kopf")
    ]


# authentication and authorisation ---------------------------------------------------------------
def test_rbac_limits_a_service_account(
    emulator: Emulator, api: k8s.ApiClient, namespace: str
) -> None:
    core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "trainer"}})
    rule = {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": ["x"],
            "verbs": ["get", "patch"]}  # fmt: skip
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "progress"}, "rules": [rule]})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "progress"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "progress"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": namespace}],
        },
    )  # fmt: skip
    create_training(api, namespace, "x")
    create_training(api, namespace, "y")
    trainer = k8s.CustomObjectsApi(
        client_for_token(emulator, f"system:serviceaccount:{namespace}:trainer")
    )
    progress = {"status": {"phase": "Running"}}
    patched = trainer.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "x", progress
    )
    assert patched["status"]["phase"] == "Running"
    for call, name in [
        (trainer.patch_namespaced_custom_object_status, "y"),
        (trainer.patch_namespaced_custom_object, "x"),
    ]:
        with pytest.raises(ApiException) as error:
            call(GROUP, VERSION, namespace, PLURAL, name, progress)
        assert error.value.status == 403
        assert "cannot patch resource" in json.loads(error.value.body)["message"]

    for token in ["", "wrong", f"system:serviceaccount:{namespace}:nobody"]:
        anonymous = k8s.CoreV1Api(client_for_token(emulator, token))
        with pytest.raises(ApiException) as error:
            anonymous.list_namespaced_config_map(namespace)
        assert error.value.status == 401


# pods and discovery -------------------------------------------------------------------------
def test_pod_logs_and_graceful_deletion(
    emulator: Emulator, api: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(api)
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    core.create_namespaced_pod(namespace, pod)
    log = emulator.log_path(namespace, "p")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("one\ntwo\nthree\n")
    assert core.read_namespaced_pod_log("p", namespace, tail_lines=2) == "two\nthree\n"
    core.patch_namespaced_pod("p", namespace, {"spec": {"nodeName": "emulator"}})
    core.delete_namespaced_pod("p", namespace)
    # a scheduled pod waits for its kubelet, which deletes it with gracePeriodSeconds=0
    assert core.read_namespaced_pod("p", namespace).metadata.deletion_timestamp
    core.delete_namespaced_pod("p", namespace, grace_period_seconds=0)
    assert core.list_namespaced_pod(namespace).items == []


def test_crd_deletion_removes_its_api(emulator: Emulator, api: k8s.ApiClient) -> None:
    extensions = k8s.ApiextensionsV1Api(api)
    crd = yaml.safe_load(CRD_FILE.read_text())
    crd["metadata"]["name"] = "others.example.com"
    crd["spec"]["group"] = "example.com"
    crd["spec"]["names"] = {"kind": "Other", "plural": "others", "singular": "other"}
    extensions.create_custom_resource_definition(crd)
    groups = [group.name for group in k8s.ApisApi(api).get_api_versions().groups]
    assert "example.com" in groups
    established = extensions.read_custom_resource_definition("others.example.com")
    assert {c.type: c.status for c in established.status.conditions}["Established"] == "True"
    extensions.delete_custom_resource_definition("others.example.com")
    groups = [group.name for group in k8s.ApisApi(api).get_api_versions().groups]
    assert "example.com" not in groups

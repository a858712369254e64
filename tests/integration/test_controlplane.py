"""The test servers are the real thing: Kubernetes built from its Go modules, and SeaweedFS S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import s3fs
import yaml
from controlplane.harness import ControlPlane, KubectlError
from controlplane.seaweed import SeaweedFS
from kubernetes import client
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
PROJECT_CRD = REPO / "crds" / "medmotrainings.medmo.io.yaml"


def pinned_k8s_version() -> str:
    versions = dict(line.split("=", 1) for line in (REPO / "tests/controlplane/versions.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    return versions["K8S_VERSION"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)
    return result


@pytest.mark.controlplane
def test_kubectl_and_api_server_report_the_pinned_release(control_plane, k8s_api):
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)

    assert versions["clientVersion"]["gitVersion"] == pinned_k8s_version()
    assert versions["serverVersion"]["gitVersion"] == pinned_k8s_version()
    assert client.VersionApi(k8s_api).get_code().git_version == pinned_k8s_version()


WIDGET_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.medmo.io
spec:
  group: harness.medmo.io
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas]
            x-kubernetes-validations:
            - rule: "!has(self.maxReplicas) || self.replicas <= self.maxReplicas"
              message: replicas must not exceed maxReplicas
            properties:
              replicas: {type: integer, minimum: 1}
              maxReplicas: {type: integer}
"""


def widget(name: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "harness.medmo.io/v1", "kind": "Widget",
                           "metadata": {"name": name}, "spec": spec})


@pytest.mark.controlplane
def test_crd_is_served_and_its_schema_enforced_by_the_api_server(control_plane, namespace):
    control_plane.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    try:
        control_plane.wait_established("widgets.harness.medmo.io")
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=widget("good", replicas=2, maxReplicas=3))
        stored = json.loads(control_plane.kubectl("get", "widget", "good", "-n", namespace, "-o", "json").stdout)
        assert stored["spec"] == {"replicas": 2, "maxReplicas": 3}

        with pytest.raises(KubectlError) as below_minimum:
            control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=widget("zero", replicas=0))
        assert "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1" \
            in below_minimum.value.stderr

        with pytest.raises(KubectlError) as cel_rule:
            control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=widget("over", replicas=5, maxReplicas=3))
        assert "replicas must not exceed maxReplicas" in cel_rule.value.stderr

        names = control_plane.kubectl("get", "widgets", "-n", namespace, "-o", "name").stdout.split()
        assert names == ["widget.harness.medmo.io/good"]
    finally:
        control_plane.kubectl("delete", "crd", "widgets.harness.medmo.io", "--wait=false")


@pytest.mark.controlplane
def test_project_crd_applies_and_is_established(control_plane):
    control_plane.kubectl("apply", "--server-side", "-f", str(PROJECT_CRD))
    control_plane.wait_established("medmotrainings.medmo.io")

    resources = control_plane.kubectl("api-resources", "--api-group=medmo.io", "-o", "name").stdout.split()
    assert resources == ["medmotrainings.medmo.io"]


@pytest.mark.controlplane
def test_garbage_collector_deletes_dependents_of_a_deleted_owner(namespace, k8s_api):
    core = client.CoreV1Api(k8s_api)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    owner_ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="child", owner_references=[owner_ref])))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander")))

    core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        try:
            core.read_namespaced_config_map("child", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(child_gone, 60, "the garbage collector to delete the owned ConfigMap")
    assert core.read_namespaced_config_map("bystander", namespace).metadata.name == "bystander"


KOPF_OPERATOR = """\
import kopf

@kopf.on.login()
def login(**kwargs):
    # kopf's own kubeconfig reader (used where the kubernetes client is not installed).
    return kopf.login_with_kubeconfig(**kwargs)

@kopf.on.create("configmaps", labels={"harness-test": "kopf"})
def on_configmap_create(patch, **_):
    patch.setdefault("data", {})["seenBy"] = "kopf"
"""


@pytest.mark.controlplane
def test_kopf_operator_logs_in_with_the_kubeconfig_and_handles_events(namespace, k8s_api, tmp_path):
    import kopf
    from kopf.testing import KopfRunner

    operator = tmp_path / "operator.py"
    operator.write_text(KOPF_OPERATOR)
    core = client.CoreV1Api(k8s_api)

    # A registry of its own: another test of this process may have imported the medmo operator's
    # handlers into kopf's default one, and this operator must run only the handlers above.
    with KopfRunner(["run", "--standalone", f"--namespace={namespace}", str(operator)], timeout=60,
                    registry=kopf.OperatorRegistry()) as runner:
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="watched", labels={"harness-test": "kopf"})))
        wait_for(lambda: (core.read_namespaced_config_map("watched", namespace).data or {}).get("seenBy") == "kopf",
                 60, "the kopf handler to patch the ConfigMap")

    assert runner.exception is None
    assert runner.exit_code == 0


@pytest.mark.s3
def test_s3_put_get_list_through_s3fs(s3_server, s3_bucket, tmp_path):
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    local = tmp_path / "weights.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))

    fs.put(str(local), f"{s3_bucket}/run/ckpt/weights.bin")
    fs.pipe(f"{s3_bucket}/run/ckpt/LATEST", b"step-7")
    fs.get(f"{s3_bucket}/run/ckpt/weights.bin", str(tmp_path / "back.bin"))

    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert sorted(fs.ls(f"{s3_bucket}/run/ckpt")) == [f"{s3_bucket[5:]}/run/ckpt/LATEST",
                                                      f"{s3_bucket[5:]}/run/ckpt/weights.bin"]


@pytest.mark.s3
def test_s3_env_points_a_subprocess_at_the_server(s3_server, s3_bucket):
    s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True).pipe(f"{s3_bucket}/note", b"from parent")
    reader = textwrap.dedent(f"""
        import s3fs
        print(s3fs.S3FileSystem().cat("{s3_bucket}/note").decode())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()

    result = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from parent"


@pytest.mark.s3
def test_s3_refuses_wrong_or_missing_credentials(s3_server, s3_bucket):
    s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True).pipe(f"{s3_bucket}/secret", b"x")
    endpoint = {"endpoint_url": s3_server.endpoint, "region_name": s3_server.region}
    wrong_secret = s3fs.S3FileSystem(key=s3_server.access_key, secret="not-the-secret", client_kwargs=endpoint,
                                     skip_instance_cache=True)
    anonymous = s3fs.S3FileSystem(anon=True, client_kwargs=endpoint, skip_instance_cache=True)

    with pytest.raises(PermissionError):
        wrong_secret.cat(f"{s3_bucket}/secret")
    with pytest.raises(PermissionError):
        anonymous.cat(f"{s3_bucket}/secret")
    with pytest.raises(PermissionError):
        wrong_secret.pipe(f"{s3_bucket}/planted", b"y")


def assert_exited(pids: list[int]) -> None:
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert alive == [], f"processes still running after stop(): {alive}"


@pytest.mark.controlplane
@pytest.mark.slow
def test_stop_leaves_no_control_plane_process_running(k8s_bin_dir, tmp_path):
    plane = ControlPlane(tmp_path / "cp", k8s_bin_dir).start()
    pids = plane.pids
    assert len(pids) == 4
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)

    plane.stop()

    assert_exited(pids)


@pytest.mark.s3
def test_stop_leaves_no_seaweedfs_process_running(tmp_path):
    server = SeaweedFS(tmp_path / "s3").start()
    pids = server.pids
    assert len(pids) == 1 and Path(f"/proc/{pids[0]}").exists()

    server.stop()

    assert_exited(pids)

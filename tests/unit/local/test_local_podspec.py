"""Env, volume and path resolution of the local pod runner, on pod dicts as the API returns them."""

import base64

import pytest

from controlplane.node_agent import NodeSpec
from medmo_operator.local.podspec import (PodConfigError, StaticObjects, container_command, container_identity,
                                          expand_references, field_ref_value, home_of, resolve_env,
                                          unsupported_features, volume_files)
from medmo_operator.local.sandbox import in_root

POD = {
    "metadata": {"name": "train-0-abc", "namespace": "runs", "uid": "u-1",
                 "labels": {"app": "medmo", "role": "learner"},
                 "annotations": {"batch.kubernetes.io/job-completion-index": "2"}},
    "spec": {"nodeName": "gpu-0", "serviceAccountName": "trainer", "containers": [{"name": "main", "command": ["true"]}]},
}


@pytest.fixture
def objects() -> StaticObjects:
    store = StaticObjects()
    store.add({"kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "runs"},
               "data": {"LR": "1e-5", "config.yaml": "steps: 3\n"},
               "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()}})
    store.add({"kind": "Secret", "metadata": {"name": "s3", "namespace": "runs"},
               "data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(b"hunter2").decode()},
               "stringData": {"AWS_ACCESS_KEY_ID": "medmo"}})
    return store


def test_field_refs_cover_names_labels_annotations_and_addresses():
    assert field_ref_value(POD, "metadata.name", "127.20.0.4") == "train-0-abc"
    assert field_ref_value(POD, "metadata.namespace", "127.20.0.4") == "runs"
    assert field_ref_value(POD, "metadata.labels['role']", "127.20.0.4") == "learner"
    assert field_ref_value(POD, "metadata.annotations['batch.kubernetes.io/job-completion-index']", "") == "2"
    assert field_ref_value(POD, "status.podIP", "127.20.0.4") == "127.20.0.4"
    assert field_ref_value(POD, "spec.nodeName", "") == "gpu-0"
    assert field_ref_value(POD, "metadata.labels", "") == 'app="medmo"\nrole="learner"\n'
    with pytest.raises(PodConfigError, match="metadata.bogus"):
        field_ref_value(POD, "metadata.bogus", "")


def test_env_combines_env_from_value_from_and_expands_references(objects):
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}, {"secretRef": {"name": "s3"}}],
        "env": [
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LR"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
            {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": True}}},
            {"name": "ADDR", "value": "$(POD_IP):29500 $(UNDEFINED) $$(RANK)"},
        ],
    }
    env = resolve_env(POD, container, objects, "127.20.0.7")
    assert env["CFG_LR"] == "1e-5" and env["AWS_ACCESS_KEY_ID"] == "medmo"
    assert env["RANK"] == "2" and env["LR"] == "1e-5" and env["KEY"] == "hunter2"
    assert "GONE" not in env
    assert env["ADDR"] == "127.20.0.7:29500 $(UNDEFINED) $(RANK)"


def test_missing_config_map_or_key_names_what_is_missing(objects):
    missing_map = {"name": "main", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "a"}}}]}
    with pytest.raises(PodConfigError, match="configMap runs/nope not found"):
        resolve_env(POD, missing_map, objects, "")
    missing_key = {"name": "main", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "a"}}}]}
    with pytest.raises(PodConfigError, match="settings has no key 'a'"):
        resolve_env(POD, missing_key, objects, "")


def test_volume_files_for_each_supported_type(objects):
    assert volume_files(POD, {"name": "c", "configMap": {"name": "settings", "items": [{"key": "config.yaml", "path": "conf/c.yaml"}]}},
                        objects, "") == {"conf/c.yaml": b"steps: 3\n"}
    assert volume_files(POD, {"name": "c", "configMap": {"name": "settings"}}, objects, "")["blob"] == b"\x00\x01"
    assert volume_files(POD, {"name": "s", "secret": {"secretName": "s3"}}, objects, "") == {
        "AWS_SECRET_ACCESS_KEY": b"hunter2", "AWS_ACCESS_KEY_ID": b"medmo"}
    assert volume_files(POD, {"name": "e", "emptyDir": {}}, objects, "") == {}
    downward = {"name": "d", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                                                       {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
    assert volume_files(POD, downward, objects, "") == {"name": b"train-0-abc", "labels": b'app="medmo"\nrole="learner"\n'}
    projected = {"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "settings", "items": [{"key": "LR", "path": "lr"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
    # StaticObjects issues no tokens, so the token file is left out rather than faked.
    assert volume_files(POD, projected, objects, "") == {"lr": b"1e-5", "namespace": b"runs"}
    with pytest.raises(PodConfigError, match="secret runs/other not found"):
        volume_files(POD, {"name": "s", "secret": {"secretName": "other"}}, objects, "")
    assert volume_files(POD, {"name": "s", "secret": {"secretName": "other", "optional": True}}, objects, "") == {}


def test_identity_takes_the_containers_security_context_over_the_pods():
    pod = {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                        "supplementalGroups": [3000], "runAsNonRoot": True}}}
    identity = container_identity(pod, {"name": "main", "securityContext": {"runAsUser": 1001, "readOnlyRootFilesystem": True,
                                                                          "allowPrivilegeEscalation": False}})
    assert (identity.uid, identity.gid, identity.groups) == (1001, 1000, (2000, 3000))
    assert identity.read_only_root and identity.no_new_privileges
    assert container_identity({"spec": {}}, {"name": "main"}).uid == 0  # the image's user: root
    assert not container_identity({"spec": {}}, {"name": "main"}).read_only_root
    with pytest.raises(PodConfigError, match="runAsNonRoot and image will run as root"):
        container_identity({"spec": {"securityContext": {"runAsNonRoot": True}}}, {"name": "main"})


def test_home_comes_from_the_images_passwd_else_root_directory():
    assert home_of(0) == "/root"
    assert home_of(54321) == "/"


def test_paths_in_a_containers_root_never_follow_symlinks_out_of_it(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute, as on the host: must mean <root>/run
    (root / "up").symlink_to("../../..")
    assert in_root(str(root), "/var/run/medmo/progress") == str(root / "run" / "medmo" / "progress")
    assert in_root(str(root), "/up/etc") == str(root / "etc")


def test_expand_references_leaves_unknown_names():
    assert expand_references("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_unsupported_features_are_named_by_field():
    pod = {"metadata": {"name": "p"}, "spec": {
        "hostNetwork": True,
        "volumes": [{"name": "h", "nfs": {"server": "x", "path": "/"}}, {"name": "e", "emptyDir": {}}],
        "containers": [{"name": "a", "command": ["x"], "securityContext": {"privileged": True}},
                       {"name": "b", "image": "unknown:1"}]}}
    found = unsupported_features(pod, entrypoints={})
    assert found[:3] == ["spec.hostNetwork", "spec.volumes[h].nfs", "spec.containers[a].securityContext.privileged"]
    assert found[3].startswith("spec.containers[b].command")
    assert unsupported_features(POD, entrypoints={}) == []


def test_image_entrypoint_stands_in_for_a_missing_command():
    entrypoints = {"registry.local/medmo-trainer": ["python", "-m", "medmo_trainer.launch"]}
    container = {"name": "t", "image": "registry.local/medmo-trainer:0.1", "args": ["--config", "c.yaml"]}
    assert container_command(container, entrypoints) == ["python", "-m", "medmo_trainer.launch", "--config", "c.yaml"]
    assert container_command({**container, "command": ["sh"]}, entrypoints) == ["sh", "--config", "c.yaml"]


def test_node_spec_parses_the_command_line_form():
    spec = NodeSpec.parse("gpu-0:cpu=16,memory=64Gi,gpu=8,label.pool=a100")
    assert (spec.name, spec.cpu, spec.memory, spec.gpus, spec.labels) == ("gpu-0", "16", "64Gi", 8, {"pool": "a100"})
    assert spec.resources()["nvidia.com/gpu"] == "8"
    assert NodeSpec.parse("gpu-1:gpu=2,devices=3:5").gpu_devices == ["3", "5"]
    with pytest.raises(ValueError, match="lists 1 ids for gpus=2"):
        NodeSpec.parse("gpu-1:gpu=2,devices=3")
    with pytest.raises(ValueError, match="unknown key 'gpu_count'"):
        NodeSpec.parse("n:gpu_count=2")
    with pytest.raises(ValueError, match="must be lower-case"):
        NodeSpec.parse("Bad_Name")

"""Env, volume and path resolution of the local pod runner, on pod dicts as the API returns them."""

import base64

import pytest

from controlplane.node_agent import NodeSpec
from medmo_operator.local.podspec import (PathMap, PodConfigError, StaticObjects, container_command,
                                          expand_references, field_ref_value, resolve_env, unsupported_features,
                                          volume_files)

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


def test_path_map_rewrites_whole_path_components_longest_first():
    paths = PathMap.of({"/etc/medmo": "/w/v/config", "/etc/medmo/extra": "/w/v/extra", "/dev/termination-log": "/w/c/tl"})
    assert paths.rewrite("--config=/etc/medmo/stage.yaml") == "--config=/w/v/config/stage.yaml"
    assert paths.rewrite("/etc/medmo/extra/a") == "/w/v/extra/a"
    assert paths.rewrite("echo done > /dev/termination-log") == "echo done > /w/c/tl"
    assert paths.rewrite("/etc/medmo2/x /opt/etc/medmo") == "/etc/medmo2/x /opt/etc/medmo"
    assert paths.rewrite("/etc/medmo") == "/w/v/config"


def test_expand_references_leaves_unknown_names():
    assert expand_references("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_unsupported_features_are_named_by_field():
    pod = {"metadata": {"name": "p"}, "spec": {
        "hostNetwork": True,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}, {"name": "e", "emptyDir": {}}],
        "containers": [{"name": "a", "command": ["x"], "securityContext": {"privileged": True}},
                       {"name": "b", "image": "unknown:1"}]}}
    found = unsupported_features(pod, entrypoints={})
    assert found[:3] == ["spec.hostNetwork", "spec.volumes[h].hostPath", "spec.containers[a].securityContext.privileged"]
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

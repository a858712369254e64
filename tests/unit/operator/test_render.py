"""Child objects of a run, built without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from medmo_cases import load_sample

from medmo_operator import api, render
from medmo_trainer.config import StageConfig
from medmo_trainer.exit_codes import NON_RETRYABLE

RUN = render.RunRef(name="medmo-8b", namespace="medmo", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://medmo-operator.medmo-system:8080", token_key=b"k" * 32)


def _spec(sample="medmo-run.yaml") -> api.MedMOTrainingSpec:
    return api.parse_training(load_sample(sample)).spec


def _stage(spec, name):
    return next(s for s in spec.stages if s.name == name)


def test_learner_job_is_indexed_one_pod_per_node_with_torchrun_rendezvous_on_rank_zero():
    spec = _spec()
    job = render.build_learner_job(RUN, spec, _stage(spec, "ground"), attempt=2, endpoints=ENDPOINTS)
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}

    assert job["metadata"]["name"] == "medmo-8b-ground-2"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 8, 8)
    assert pod["subdomain"] == "medmo-8b-ground"
    assert env["PET_MASTER_ADDR"]["value"] == "medmo-8b-ground-2-0.medmo-8b-ground"
    assert env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "training-high"


def test_job_fails_fast_on_non_retryable_exit_codes_and_never_retries_a_pod_itself():
    spec = _spec()
    job = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)
    rules = job["spec"]["podFailurePolicy"]["rules"]

    assert job["spec"]["backoffLimit"] == 0
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == sorted(NON_RETRYABLE)


def test_kueue_queue_label_creates_the_job_suspended_and_gang_puts_pods_in_the_attempts_pod_group():
    spec = _spec()
    job = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)

    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["schedulingGroup"] == {"podGroupName": "medmo-8b-align-0"}


def test_pods_run_as_non_root_and_read_credentials_only_by_reference():
    spec = _spec()
    children = render.build_stage_children(RUN, spec, _stage(spec, "grpo"), 0, ENDPOINTS)
    text = yaml.safe_dump(children)

    for child in children:
        if child["kind"] in ("Job", "Deployment"):
            pod = child["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                keys = [e for e in container["env"] if e["name"].startswith("AWS_") and "KEY" in e["name"]]
                assert all("secretKeyRef" in e["valueFrom"] for e in keys)
    assert "s3-credentials" in text


def test_every_child_is_owned_by_the_run():
    spec = _spec()
    for stage in spec.stages:
        for child in render.build_stage_children(RUN, spec, stage, 0, ENDPOINTS):
            (owner,) = child["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"], owner["controller"]) == ("MedMOTraining", "uid-1", True)


def test_rl_stage_adds_separately_scaled_rollout_and_reward_workers():
    spec = _spec()
    children = render.build_stage_children(RUN, spec, _stage(spec, "grpo"), 0, ENDPOINTS)
    deployments = {c["metadata"]["name"]: c for c in children if c["kind"] == "Deployment"}

    rollout, reward = deployments["medmo-8b-grpo-rollout"], deployments["medmo-8b-grpo-reward"]
    assert rollout["spec"]["replicas"] == 4 and reward["spec"]["replicas"] == 2
    assert rollout["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in reward["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    config = StageConfig.model_validate(yaml.safe_load(next(c for c in children if c["kind"] == "ConfigMap")["data"]["stage.yaml"]))
    assert config.rl.rollout_urls == ["http://medmo-8b-grpo-rollout:8000"]
    assert (config.rl.rollout_requests_per_step, config.rl.reward_requests_per_step) == (4, 2)
    assert config.rl.algorithm.group_size == 8


def test_each_stage_starts_from_the_previous_training_stages_export():
    spec = _spec()
    configs = [render.build_stage_config(RUN, spec, stage) for stage in spec.stages]

    assert configs[0].model.base == "s3://medmo-runs/medmo-8b/base_model"  # the model initializer's copy of the hub model
    assert configs[1].model.base == "s3://medmo-runs/medmo-8b/align/model"
    assert configs[4].model.base == "s3://medmo-runs/medmo-8b/grpo/model"
    assert configs[0].model.trainable == ["projector"]
    assert configs[2].checkpoint_uri == "s3://medmo-runs/medmo-8b/instruct/checkpoints"


def test_each_stage_config_carries_the_runs_uid_for_its_checkpoints_to_record():
    """A run deleted and applied again under the same name gets a new uid: its stages must not resume
    the old run's checkpoints, which record the uid they were written under."""
    spec = _spec()
    again = render.RunRef(name=RUN.name, namespace=RUN.namespace, uid="uid-after-reapply")
    for stage in spec.stages:
        assert render.build_stage_config(RUN, spec, stage).run_uid == "uid-1"
        config_map = render.build_config_map(again, spec, stage)
        assert yaml.safe_load(config_map["data"][render.CONFIG_FILE])["runUid"] == "uid-after-reapply"


def test_progress_token_is_per_run_and_mounted_not_inlined():
    spec = _spec()
    other = render.RunRef(name="other", namespace="medmo", uid="uid-2")
    job = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert render.progress_token(RUN, ENDPOINTS.token_key) != render.progress_token(other, ENDPOINTS.token_key)
    assert render.progress_token(RUN, ENDPOINTS.token_key) not in yaml.safe_dump(job)
    assert env["MEDMO_PROGRESS_TOKEN_FILE"] == "/var/run/medmo/progress/token"
    assert env["MEDMO_PROGRESS_URL"].endswith("/v1/namespaces/medmo/medmotrainings/medmo-8b/progress")


def test_cpu_pool_runs_one_process_per_pod_and_requests_no_gpu():
    spec = _spec("medmo-tiny.yaml")
    job = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}

    assert env["PET_NPROC_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in str(container.get("resources"))


def test_eval_after_rl_compares_with_the_model_from_before_rl():
    spec = _spec()
    config = render.build_stage_config(RUN, spec, _stage(spec, "bench"))

    assert config.evaluation.model_name == "grpo"
    assert [(m.name, m.uri) for m in config.evaluation.compare_models] == [("instruct", "s3://medmo-runs/medmo-8b/instruct/model")]


def _pods(children):
    return [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment")]


def test_every_cache_of_a_read_only_pod_is_written_to_its_cache_volume():
    spec = _spec()
    for pod in _pods(render.build_stage_children(RUN, spec, _stage(spec, "grpo"), 0, ENDPOINTS)):
        cache = next(v for v in pod["volumes"] if v["name"] == "cache")
        assert cache == {"name": "cache", "emptyDir": {}}  # the default: a fresh directory per pod
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounted = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            env = {e["name"]: e.get("value") for e in container["env"]}
            for variable in ("HOME", "MEDMO_CACHE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
                             "MPLCONFIGDIR", "XDG_CACHE_HOME"):
                assert any(env[variable] == path or env[variable].startswith(path + "/") for path in mounted), variable


def test_the_cache_volume_and_file_storage_come_from_the_spec():
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["cache"] = {"persistentVolumeClaim": {"claimName": "medmo-cache"}}
    spec = api.parse_training(obj).spec
    pod = _pods(render.build_stage_children(RUN, spec, spec.stages[0], 0, ENDPOINTS))[0]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "medmo-cache"}} in pod["volumes"]
    storage = next(v for v in pod["volumes"] if v["name"] == "storage")
    assert storage["hostPath"]["path"] == "/tmp/medmo/runs/medmo-tiny"
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert mounts.index("/tmp/medmo/runs/medmo-tiny") > mounts.index("/tmp")  # mounted onto the /tmp volume


def test_a_cache_names_exactly_one_volume_source():
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["cache"] = {"hostPath": {"path": "/var/cache/medmo"}, "emptyDir": {}}
    with pytest.raises(ValueError, match="exactly one of persistentVolumeClaim, hostPath, emptyDir"):
        api.parse_training(obj)


def test_rl_workers_require_the_runs_token_from_its_mounted_secret():
    spec = _spec()
    children = render.build_stage_children(RUN, spec, _stage(spec, "grpo"), 0, ENDPOINTS)
    secret = next(c for c in children if c["kind"] == "Secret")

    for role in render.WORKER_ROLES:
        deployment = next(c for c in children
                          if c["kind"] == "Deployment" and c["metadata"]["name"] == f"medmo-8b-grpo-{role}")
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        token_file = container["args"][container["args"].index("--token-file") + 1]
        mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == secret["metadata"]["name"] and mount["readOnly"] is True
        assert token_file.removeprefix(mount["mountPath"] + "/") in secret["stringData"]
        assert render.progress_token(RUN, ENDPOINTS.token_key) not in yaml.safe_dump(deployment)
        # the kubelet's probes carry no token: they call the workers' open routes
        assert {container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]} == {
            "/readyz", "/healthz"}


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions In/Exists) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def test_only_the_runs_own_pods_reach_its_rl_workers():
    """The policy is checked here as data: the test control plane's kubelet does not enforce
    NetworkPolicies (the operator tests that run an rl stage show the API server accepts it)."""
    spec = _spec()
    stage = _stage(spec, "grpo")
    children = render.build_stage_children(RUN, spec, stage, 0, ENDPOINTS)
    (policy,) = [c for c in children if c["kind"] == "NetworkPolicy"]
    pods = {c["metadata"]["name"]: c["spec"]["template"]["metadata"]["labels"] for c in children
            if c["kind"] in ("Job", "Deployment")}
    other_run = render.build_stage_children(render.RunRef("medmo-4b", "medmo", "uid-2"), spec, stage, 0, ENDPOINTS)
    stranger = next(c for c in other_run if c["kind"] == "Job")["spec"]["template"]["metadata"]["labels"]
    (rule,) = policy["spec"]["ingress"]

    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["metadata"]["name"] == render.worker_network_policy_name(RUN, stage)
    # it covers both worker groups of this stage, and not the learner (whose rendezvous is its own affair)
    assert {name for name, labels in pods.items() if _selects(policy["spec"]["podSelector"], labels)} == {
        "medmo-8b-grpo-rollout", "medmo-8b-grpo-reward"}
    # from: every pod of this run (its learner ranks), no pod of another run, and only to the workers' port
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: the run's own namespace only
    assert all(_selects(peer["podSelector"], labels) for labels in pods.values())
    assert not _selects(peer["podSelector"], stranger)
    assert rule["ports"] == [{"protocol": "TCP", "port": render.WORKER_PORT}]
    assert not [c for c in render.build_stage_children(RUN, spec, _stage(spec, "ground"), 0, ENDPOINTS)
                if c["kind"] == "NetworkPolicy"]


def test_only_pods_of_runs_reach_the_operators_progress_port():
    base = Path(__file__).resolve().parents[3] / "manifests" / "base"
    documents = [d for name in ("networkpolicy.yaml", "deployment.yaml")
                 for d in yaml.safe_load_all((base / name).read_text())]
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy"]
    operator = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]
    ports = operator["spec"]["containers"][0]["ports"]
    progress_port = next(p["containerPort"] for p in ports if p["name"] == "progress")
    spec = _spec()
    learner = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)["spec"]["template"]["metadata"]["labels"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}

    assert _selects(policy["spec"]["podSelector"], operator["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (peer,) = rules[progress_port]
    assert peer["namespaceSelector"] == {}  # runs live in any namespace
    assert _selects(peer["podSelector"], learner)
    assert not _selects(peer["podSelector"], {"app": "anything-else"})
    assert set(rules) == {progress_port, 9090}  # and the metrics port, open to any scraper

"""The node agent on the real control plane: Nodes, pods run as processes, and the controllers' work on them.

The API server, scheduler and controller-manager are real; only containers are processes rather
than images (there is no container runtime here).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from polling import alive, wait_for

from controlplane import node_agent as node_agent_module
from controlplane.node_agent import NodeAgent, NodeSpec

pytestmark = pytest.mark.controlplane


def apply(control_plane, *objects: dict) -> None:
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def get(control_plane, kind: str, name: str, namespace: str) -> dict:
    return json.loads(control_plane.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def pods_of(core: client.CoreV1Api, namespace: str, selector: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def pid_of(container_status) -> int:
    return int(container_status.container_id.removeprefix("local://"))


def python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def bare_pod(name: str, namespace: str, command: list[str], restart_policy: str = "Never", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": restart_policy, "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "main", "image": "medmo-test", "command": command}], **spec}}


def test_nodes_are_ready_with_their_gpu_capacity(control_plane, node_agent):
    listing = control_plane.kubectl("get", "nodes").stdout
    nodes = {n["metadata"]["name"]: n for n in json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    for name in ("node-a", "node-b"):
        assert any(line.split()[:2] == [name, "Ready"] for line in listing.splitlines()), listing
        status = nodes[name]["status"]
        assert status["capacity"]["nvidia.com/gpu"] == "2" and status["allocatable"]["nvidia.com/gpu"] == "2"
        assert status["allocatable"]["cpu"] == "8"
    lease = client.CoordinationV1Api(node_agent.api).read_namespaced_lease("node-a", "kube-node-lease")
    assert lease.spec.holder_identity == "node-a"


def test_indexed_job_pods_see_their_own_index_and_name(control_plane, namespace, k8s_api, node_agent):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "ranks", "namespace": namespace},
           "spec": {"completions": 3, "parallelism": 3, "completionMode": "Indexed", "template": {"spec": {
               "restartPolicy": "Never",
               "containers": [{"name": "rank", "image": "medmo-test",
                               "command": ["sh", "-c", "echo index=$JOB_COMPLETION_INDEX pod=$POD_NAME"],
                               "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}}}
    apply(control_plane, job)
    control_plane.kubectl("wait", "--for=condition=Complete", "job/ranks", "-n", namespace, "--timeout=120s")
    pods = pods_of(client.CoreV1Api(k8s_api), namespace, "job-name=ranks")
    seen = {}
    for pod in pods:
        log = node_agent.pod(namespace, pod.metadata.name).log_path("rank").read_text().strip()
        index = pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]
        assert log == f"index={index} pod={pod.metadata.name}"
        seen[index] = pod.metadata.name
    assert sorted(seen) == ["0", "1", "2"]


def test_deployment_pods_run_and_killed_processes_are_replaced(control_plane, namespace, k8s_api, node_agent):
    core = client.CoreV1Api(k8s_api)
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": namespace},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {
                      "metadata": {"labels": {"app": "web"}},
                      "spec": {"terminationGracePeriodSeconds": 5, "containers": [
                          {"name": "web", "image": "medmo-test", "command": ["sleep", "600"]}]}}}}
    apply(control_plane, deployment)
    control_plane.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=120s")

    def ready_pods():
        pods = [p for p in pods_of(core, namespace, "app=web") if p.metadata.deletion_timestamp is None]
        ready = [p for p in pods if p.status.container_statuses and p.status.container_statuses[0].ready]
        return ready if len(ready) == 2 else None

    victim = wait_for(ready_pods, what="two ready pods")[0]
    old_pid = pid_of(victim.status.container_statuses[0])
    os.kill(old_pid, signal.SIGKILL)  # the container's process dies: the kubelet's job is to restart it

    def restarted():
        status = core.read_namespaced_pod(victim.metadata.name, namespace).status.container_statuses[0]
        return status.restart_count == 1 and status.ready and status

    status = wait_for(restarted, what="the killed container restarted")
    assert status.last_state.terminated.exit_code == 128 + signal.SIGKILL
    assert pid_of(status) != old_pid and alive(pid_of(status))

    # A deleted pod is the ReplicaSet's to replace, with a new pod that runs.
    core.delete_namespaced_pod(victim.metadata.name, namespace)
    replacement = wait_for(lambda: (pods := ready_pods()) and victim.metadata.name not in {p.metadata.name for p in pods} and pods,
                           what="a replacement pod")
    assert all(alive(pid_of(p.status.container_statuses[0])) for p in replacement)
    assert not alive(pid_of(status))


def test_failed_container_reports_exit_code_reason_and_message(control_plane, namespace, node_agent):
    apply(control_plane, bare_pod("exit-3", namespace, ["sh", "-c", "echo 'config invalid' > /dev/termination-log; exit 3"]))
    pod = wait_for(lambda: (p := get(control_plane, "pod", "exit-3", namespace))["status"].get("phase") == "Failed" and p,
                   what="the pod failing")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"].strip() == "config invalid"


def test_deleting_a_job_garbage_collects_its_pods(control_plane, namespace, k8s_api, node_agent):
    core = client.CoreV1Api(k8s_api)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "long", "namespace": namespace},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                                          "containers": [{"name": "main", "image": "medmo-test", "command": ["sleep", "600"]}]}}}}
    apply(control_plane, job)
    pod = wait_for(lambda: [p for p in pods_of(core, namespace, "job-name=long")
                            if p.status.container_statuses and p.status.container_statuses[0].ready], what="the job's pod running")[0]
    pid = pid_of(pod.status.container_statuses[0])
    control_plane.kubectl("delete", "job", "long", "-n", namespace, "--wait=false")  # background propagation: the GC deletes pods
    wait_for(lambda: not pods_of(core, namespace, "job-name=long"), what="the pods garbage-collected")
    assert not alive(pid)


def test_gpu_pod_waits_for_a_node_with_enough_gpus(control_plane, namespace, k8s_api, node_agent):
    # Other tests may have added GPU nodes to this session's cluster: ask for more than any has.
    nodes = client.CoreV1Api(k8s_api).list_node().items
    gpus = 1 + max(int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) for n in nodes)
    pod = bare_pod("big", namespace, ["sh", "-c", "echo running on $NODE"])
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod["spec"]["containers"][0]["env"] = [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    apply(control_plane, pod)

    def unschedulable():
        conditions = get(control_plane, "pod", "big", namespace)["status"].get("conditions") or []
        return [c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"
                and c["reason"] == "Unschedulable"]

    condition = wait_for(unschedulable, what="PodScheduled=False Unschedulable")[0]
    assert "nvidia.com/gpu" in condition["message"]
    assert get(control_plane, "pod", "big", namespace)["status"]["phase"] == "Pending"

    node = f"gpu-big-{uuid.uuid4().hex[:6]}"
    node_agent.add_node(NodeSpec(name=node, gpus=gpus))
    try:
        done = wait_for(lambda: (p := get(control_plane, "pod", "big", namespace))["status"].get("phase") == "Succeeded" and p,
                        timeout_s=120, what="the pod running on the new node")
        assert done["spec"]["nodeName"] == node
        assert node_agent.pod(namespace, "big").log_path("main").read_text() == f"running on {node}\n"
    finally:
        node_agent.remove_node(node)  # later tests see the cluster's GPU capacity as before
    assert node not in {n.metadata.name for n in client.CoreV1Api(k8s_api).list_node().items}


def test_pods_see_only_the_gpus_they_were_given(control_plane, namespace, node_agent):
    node = f"gpu-dev-{uuid.uuid4().hex[:6]}"
    node_agent.add_node(NodeSpec(name=node, gpus=2, gpu_devices=["3", "5"]))
    try:
        pods = []
        for name, gpus in (("one", 1), ("other", 1), ("none", 0)):
            # They keep running, so both GPU pods hold their devices at once.
            pod = bare_pod(name, namespace, ["sh", "-c", "echo \"[$CUDA_VISIBLE_DEVICES]\"; exec sleep 600"],
                           nodeSelector={"kubernetes.io/hostname": node})
            if gpus:
                pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
            pods.append(pod)
        apply(control_plane, *pods)
        seen = {name: wait_for(lambda: _log_of(node_agent, namespace, name), what=f"pod {name} printing")
                for name in ("one", "other", "none")}
        assert sorted([seen["one"], seen["other"]]) == ["[3]", "[5]"]
        assert seen["none"] == "[]"
    finally:
        node_agent.remove_node(node)


SERVER = """
    import http.server, os
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(os.environ["POD_NAME"].encode())
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""

CLIENT = """
    import time, urllib.request
    for name in ("web-0.web", "web-1.web"):
        for attempt in range(120):  # until the servers listen and their names are published
            try:
                print(name, urllib.request.urlopen(f"http://{name}:8080/", timeout=5).read().decode(), flush=True)
                break
            except OSError:
                time.sleep(0.5)
"""


def test_two_servers_on_one_port_reached_by_headless_service_names(control_plane, namespace, node_agent):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
               "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]}}
    servers = []
    for index in range(2):
        server = bare_pod(f"web-{index}", namespace, python(SERVER), restart_policy="Always",
                          hostname=f"web-{index}", subdomain="web")
        server["metadata"]["labels"] = {"app": "web"}
        server["spec"]["containers"][0]["env"] = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
        servers.append(server)
    apply(control_plane, service, *servers, bare_pod("client", namespace, python(CLIENT)))
    pod = wait_for(lambda: (p := get(control_plane, "pod", "client", namespace))["status"].get("phase") in ("Succeeded", "Failed") and p,
                   timeout_s=120, what="the client finishing")
    log = node_agent.pod(namespace, "client").log_path("main").read_text()
    assert pod["status"]["phase"] == "Succeeded", log
    assert log.splitlines() == ["web-0.web web-0", "web-1.web web-1"]
    addresses = {get(control_plane, "pod", f"web-{i}", namespace)["status"]["podIP"] for i in range(2)}
    assert len(addresses) == 2 and all(a.startswith("127.") for a in addresses)


def test_config_map_secret_and_downward_api_reach_the_process(control_plane, namespace, node_agent):
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
                  "data": {"stage.yaml": "steps: 3\n", "LR": "1e-5"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": namespace},
              "stringData": {"token": "s3cr3t"}}
    pod = bare_pod("reader", namespace, python("""
        import os
        print(open("/etc/medmo/stage.yaml").read().strip())
        print(open("/var/run/creds/token").read())
        print(open("/etc/podinfo/labels").read().strip())
        print(os.environ["LR"], os.environ["TOKEN"], os.environ["POD_IP"] == os.environ["MEDMO_POD_IP"], os.environ["ROLE"])
    """))
    pod["metadata"]["labels"] = {"role": "learner"}
    pod["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "settings", "items": [{"key": "stage.yaml", "path": "stage.yaml"}]}},
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/medmo"}, {"name": "creds", "mountPath": "/var/run/creds"},
                                 {"name": "podinfo", "mountPath": "/etc/podinfo"}]
    container["env"] = [
        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LR"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}}]
    apply(control_plane, config_map, secret, pod)
    done = wait_for(lambda: (p := get(control_plane, "pod", "reader", namespace))["status"].get("phase") in ("Succeeded", "Failed") and p,
                    what="the pod finishing")
    log = node_agent.pod(namespace, "reader").log_path("main").read_text()
    assert done["status"]["phase"] == "Succeeded", log
    assert log.splitlines() == ["steps: 3", "s3cr3t", 'role="learner"', "1e-5 s3cr3t True learner"]


def test_stop_leaves_nothing_running(control_plane, namespace, tmp_path):
    node = f"stop-{uuid.uuid4().hex[:6]}"
    agent = NodeAgent(control_plane.kubeconfig, tmp_path, [NodeSpec(name=node)]).start()
    try:
        # Bound straight to the node (no scheduler), as a kubelet's static assignment would be.
        apply(control_plane, bare_pod("sleepers", namespace, ["sh", "-c", "sleep 600 & sleep 600 & wait"],
                                      restart_policy="Always", nodeName=node))
        running = wait_for(lambda: _pod_or_none(agent, namespace, "sleepers"), what="the pod on the agent")
        leader = wait_for(lambda: running.pids().get("main"), what="the container's process")
        members = wait_for(lambda: len(m := _group_members(leader)) >= 3 and m, what="the background sleeps")
    finally:
        agent.stop(delete_nodes=True)
    assert not [pid for pid in members if alive(pid)]


def _log_of(agent: NodeAgent, namespace: str, name: str) -> str | None:
    pod = _pod_or_none(agent, namespace, name)
    return pod and pod.log_path("main").exists() and pod.log_path("main").read_text().strip()


def _pod_or_none(agent: NodeAgent, namespace: str, name: str):
    try:
        return agent.pod(namespace, name)
    except KeyError:
        return None


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def test_command_line_agent_registers_its_nodes_until_interrupted(control_plane, tmp_path):
    import subprocess
    import sys

    node = f"cli-{uuid.uuid4().hex[:6]}"
    agent = subprocess.Popen([sys.executable, str(Path(node_agent_module.__file__)), "--kubeconfig",
                              str(control_plane.kubeconfig), "--node", f"{node}:cpu=4,memory=8Gi,gpu=8",
                              "--workdir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline().startswith(f"nodes {node} ready")
        status = get(control_plane, "node", node, "default")["status"]
        assert status["capacity"]["nvidia.com/gpu"] == "8" and status["capacity"]["memory"] == "8Gi"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    finally:
        agent.send_signal(signal.SIGINT)
        assert agent.wait(timeout=30) == 0
        control_plane.kubectl("delete", "node", node)

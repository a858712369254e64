"""The local pod runner without an API server: real processes, real sockets on loopback addresses."""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import textwrap
import time
import uuid

import pytest

from polling import alive, wait_for

from medmo_operator.local import PodRunner, StaticObjects


def make_pod(name: str, containers: list[dict], restart_policy: str = "Never", **spec) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": str(uuid.uuid4()), "labels": {"app": name}},
            "spec": {"restartPolicy": restart_policy, "containers": containers, **spec}}


def python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


@pytest.fixture
def runner(tmp_path):
    runner = PodRunner(tmp_path, StaticObjects(), backoff_base_s=0.2, backoff_max_s=1.0)
    yield runner
    runner.stop()


def headless_service(name: str, selector: dict) -> dict:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"clusterIP": "None", "selector": selector}}


def test_exit_code_reason_and_termination_message(runner):
    pod = runner.start(make_pod("fails", [
        {"name": "main", "command": ["sh", "-c", "echo 'bad input: x' > /dev/termination-log; exit 3"]},
        {"name": "logs", "command": ["sh", "-c", "echo last words; exit 4"], "terminationMessagePolicy": "FallbackToLogsOnError"},
    ]))
    assert pod.wait_finished(30) == "Failed"
    main, logs = pod.status()["containerStatuses"]
    assert main["state"]["terminated"]["exitCode"] == 3
    assert main["state"]["terminated"]["reason"] == "Error"
    assert main["state"]["terminated"]["message"] == "bad input: x\n"
    assert logs["state"]["terminated"]["message"] == "last words"


def test_a_command_that_cannot_start_fails_with_its_error(runner):
    pod = runner.start(make_pod("typo", [{"name": "main", "command": ["pyhton", "-c", "pass"]}]))
    assert pod.wait_finished(30) == "Failed"
    terminated = pod.status()["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "StartError"
    assert "pyhton" in terminated["message"]


def test_init_containers_run_first_and_share_volumes(runner):
    pod = runner.start(make_pod("init", [{"name": "main", "command": ["cat", "/data/greeting"],
                                          "volumeMounts": [{"name": "scratch", "mountPath": "/data"}]}],
                                initContainers=[{"name": "prepare", "command": ["sh", "-c", "echo hi > /data/greeting"],
                                                 "volumeMounts": [{"name": "scratch", "mountPath": "/data"}]}],
                                volumes=[{"name": "scratch", "emptyDir": {}}]))
    assert pod.wait_finished(30) == "Succeeded"
    assert pod.log_path("main").read_text() == "hi\n"
    assert pod.status()["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_restart_policy_on_failure_restarts_until_success(runner, tmp_path):
    # The count lives on the host (a hostPath volume): a restarted container's root starts afresh.
    pod = runner.start(make_pod("flaky", [{"name": "main", "command": python("""
        import pathlib, sys
        p = pathlib.Path("/state/attempts"); n = int(p.read_text()) if p.exists() else 0
        p.write_text(str(n + 1)); sys.exit(0 if n >= 2 else 1)"""),
        "volumeMounts": [{"name": "state", "mountPath": "/state"}]}], restart_policy="OnFailure",
        volumes=[{"name": "state", "hostPath": {"path": str(tmp_path / "state"), "type": "DirectoryOrCreate"}}]))
    assert pod.wait_finished(60) == "Succeeded"
    status = pod.status()["containerStatuses"][0]
    assert status["restartCount"] == 2
    assert status["lastState"]["terminated"]["exitCode"] == 1


def test_graceful_stop_then_kill_of_the_whole_process_group(runner, tmp_path):
    # "polite" exits on SIGTERM; "stubborn" ignores it and leaves a background child behind.
    pod = runner.start(make_pod("stop-me", [
        {"name": "polite", "command": python("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *_: (print("terminating", flush=True), sys.exit(0)))
            time.sleep(600)""")},
        {"name": "stubborn", "command": ["sh", "-c", "trap '' TERM; sleep 600 & wait"]},
    ], restart_policy="Always"))
    wait_for(lambda: len(pod.pids()) == 2, what="containers")
    pids = pod.pids()
    # The background sleep's pid inside the container's PID namespace means nothing here: find it on the host.
    child = wait_for(lambda: [p for p in _group(pids["stubborn"]) if _command_line(p) == "sleep 600"], what="the sleep")[0]
    time.sleep(1)  # let python install its handler
    started = time.monotonic()
    runner.stop_pod(pod.uid, grace_s=2)
    assert time.monotonic() - started >= 1.5  # the stubborn one used its grace period
    assert not any(alive(p) for p in [*pids.values(), child])
    assert "terminating" in pod.log_path("polite").read_text()
    states = {c["name"]: c["state"]["terminated"] for c in pod.status()["containerStatuses"]}
    assert states["polite"]["exitCode"] == 0
    assert states["stubborn"]["exitCode"] == 128 + signal.SIGKILL


def test_what_cannot_run_fails_the_pod_with_a_reason(runner):
    pod = runner.start(make_pod("privileged", [{"name": "main", "command": ["true"],
                                                "securityContext": {"privileged": True}}],
                                volumes=[{"name": "disk", "persistentVolumeClaim": {"claimName": "data"}}]))
    assert pod.wait_finished(10) == "Failed"
    status = pod.status()
    assert status["reason"] == "UnsupportedPodSpec"
    assert "spec.volumes[disk].persistentVolumeClaim" in status["message"]
    assert "securityContext.privileged" in status["message"]


SERVER = """
    import http.server, socket, sys
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = socket.gethostname().encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
    http.server.HTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""


def test_pods_share_a_port_and_reach_each_other_and_the_host_by_name(runner):
    """Two servers on port 8080 (bound to 0.0.0.0), a client reaching each by name, and the host's loopback."""
    import http.server
    import threading

    host_server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=host_server.serve_forever, daemon=True).start()
    try:
        runner.add_service(headless_service("web", {"tier": "web"}))
        servers = []
        for index in range(2):
            spec = make_pod(f"web-{index}", [{"name": "main", "command": python(SERVER)}], restart_policy="Always",
                            hostname=f"web-{index}", subdomain="web")
            spec["metadata"]["labels"]["tier"] = "web"
            servers.append(runner.start(spec))
        for server in servers:
            wait_for(lambda: (server.network_dir / "ports" / "tcp-8080").exists(), what="server listening")
        client = runner.start(make_pod("client", [{"name": "main", "command": python(f"""
            import socket, urllib.request
            for name in ("web-0.web", "web-1.web.ns.svc.cluster.local"):
                print(name, urllib.request.urlopen(f"http://{{name}}:8080/", timeout=10).read().decode())
            print("host", urllib.request.urlopen("http://127.0.0.1:{host_server.server_port}/", timeout=10).status)
            print("service", socket.gethostbyname("web") in ("{servers[0].ip}", "{servers[1].ip}"))""")}]))
        assert client.wait_finished(60) == "Succeeded", client.log_path("main").read_text()
        lines = client.log_path("main").read_text().splitlines()
        assert lines == ["web-0.web web-0", "web-1.web.ns.svc.cluster.local web-1", "host 200", "service True"]
        assert servers[0].ip != servers[1].ip
    finally:
        host_server.shutdown()
        host_server.server_close()


def test_readiness_probe_gates_ready_and_the_service_name(runner):
    """A server that listens only after a while is Ready, and named by its Service, once its probe passes."""
    runner.add_service(headless_service("slow", {"tier": "slow"}))
    spec = make_pod("slow-0", [{"name": "main", "command": python("""
        import http.server, time
        time.sleep(2)
        http.server.HTTPServer(("0.0.0.0", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()"""),
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 0.2}}], restart_policy="Always")
    spec["metadata"]["labels"]["tier"] = "slow"
    server = runner.start(spec)
    probe_client = runner.start(make_pod("probe-client", [{"name": "main", "command": ["sleep", "600"]}]))
    wait_for(lambda: server.status()["containerStatuses"][0]["state"].get("running"), what="the server process")
    assert not server.status()["containerStatuses"][0]["ready"]
    assert " slow" not in runner.hosts_file(probe_client).read_text()
    wait_for(lambda: server.status()["containerStatuses"][0]["ready"], what="the probe passing")
    conditions = {c["type"]: c["status"] for c in server.status()["conditions"]}
    assert conditions["Ready"] == "True"
    wait_for(lambda: f"{server.ip} slow.ns.svc.cluster.local" in runner.hosts_file(probe_client).read_text(),
             what="the Service name published")


def test_torch_tcp_stores_of_two_pods_on_one_port(runner):
    """torch's TCPStore binds the wildcard address and connects to itself via localhost; both must work per pod."""
    runner.add_service(headless_service("rdzv", {"tier": "rdzv"}))
    masters = []
    for index in range(2):
        spec = make_pod(f"rank-{index}", [{"name": "main", "command": python(f"""
            import datetime, time, torch.distributed as dist
            store = dist.TCPStore("localhost", 29500, 2, True, timeout=datetime.timedelta(seconds=60))
            store.set("who", "rank-{index}")
            store.wait(["done"])""")}], hostname=f"rank-{index}", subdomain="rdzv")
        spec["metadata"]["labels"]["tier"] = "rdzv"
        masters.append(runner.start(spec))
    client = runner.start(make_pod("worker", [{"name": "main", "command": python("""
        import datetime, torch.distributed as dist
        for host in ("rank-0.rdzv", "rank-1.rdzv"):
            store = dist.TCPStore(host, 29500, 2, False, timeout=datetime.timedelta(seconds=60))
            print(host, store.get("who").decode(), flush=True)
            store.set("done", "1")""")}]))
    assert client.wait_finished(120) == "Succeeded", client.log_path("main").read_text()
    assert [l for l in client.log_path("main").read_text().splitlines() if ".rdzv" in l] == [
        "rank-0.rdzv rank-0", "rank-1.rdzv rank-1"]
    for master in masters:
        assert master.wait_finished(30) == "Succeeded", master.log_path("main").read_text()


def test_stop_leaves_no_process_behind(tmp_path):
    runner = PodRunner(tmp_path, StaticObjects())
    pods = [runner.start(make_pod(f"sleeper-{i}", [{"name": "main", "command": ["sh", "-c", "sleep 600 & sleep 600"]}]))
            for i in range(2)]
    wait_for(lambda: all(p.pids() for p in pods), what="processes")
    time.sleep(0.5)
    group_members = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _pgid(int(pid)) in
                     {pid for p in pods for pid in p.pids().values()}]
    assert len(group_members) >= 4  # each pod: the shell and its two sleeps
    runner.stop()
    assert not any(alive(pid) for pid in group_members)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group(pgid: int) -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _pgid(int(pid)) == pgid]


def _command_line(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except FileNotFoundError:
        return ""


def test_python_of_this_environment_runs_pods(runner):
    pod = runner.start(make_pod("which", [{"name": "main", "command": python("import sys; print(sys.prefix)")}]))
    assert pod.wait_finished(30) == "Succeeded"
    assert pod.log_path("main").read_text().strip() == sys.prefix


# --- confinement: what a kubelet and a container runtime enforce -----------------------------------

def _finished_log(pod, container: str = "main") -> tuple[str, str]:
    phase = pod.wait_finished(60)
    return phase, pod.log_path(container).read_text()


def test_read_only_root_filesystem_refuses_writes_outside_volumes(runner):
    pod = runner.start(make_pod("read-only", [{"name": "main", "command": ["sh", "-c", "echo x > /written"],
                                               "securityContext": {"readOnlyRootFilesystem": True},
                                               "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                                volumes=[{"name": "scratch", "emptyDir": {}}]))
    phase, log = _finished_log(pod)
    assert phase == "Failed"
    assert "Read-only file system" in log
    allowed = runner.start(make_pod("read-only-volume", [{"name": "main", "command": ["sh", "-c", "echo y > /scratch/ok && cat /scratch/ok"],
                                                           "securityContext": {"readOnlyRootFilesystem": True},
                                                           "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                                    volumes=[{"name": "scratch", "emptyDir": {}}]))
    assert _finished_log(allowed) == ("Succeeded", "y\n")


def test_a_pod_runs_as_its_users_and_groups(runner):
    pod = runner.start(make_pod("ids", [{"name": "main", "command": ["sh", "-c", "id -u; id -g; id -G"],
                                         "securityContext": {"runAsUser": 1234}}],
                                securityContext={"runAsUser": 1000, "runAsGroup": 1500, "fsGroup": 2000}))
    phase, log = _finished_log(pod)
    assert phase == "Succeeded", log
    uid, gid, groups = log.splitlines()
    assert (uid, gid) == ("1234", "1500")
    assert "2000" in groups.split()


def test_run_as_non_root_refuses_a_root_container(runner):
    pod = runner.start(make_pod("root", [{"name": "main", "command": ["true"]}],
                                securityContext={"runAsNonRoot": True}))
    waiting = wait_for(lambda: pod.status()["containerStatuses"][0]["state"].get("waiting", {}).get("reason")
                       == "CreateContainerConfigError" and pod.status()["containerStatuses"][0]["state"]["waiting"],
                       what="CreateContainerConfigError")
    assert "runAsNonRoot" in waiting["message"]
    assert not pod.pids() and pod.phase == "Pending"


def test_a_non_root_user_writes_its_empty_dir_and_runs_this_python(runner):
    pod = runner.start(make_pod("writer", [{"name": "main", "command": python("""
        import os, pathlib, sys
        pathlib.Path("/cache/model.bin").write_bytes(b"weights")
        print(os.getuid(), pathlib.Path("/cache/model.bin").stat().st_uid, sys.prefix)"""),
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}],
        volumes=[{"name": "cache", "emptyDir": {}}]))
    phase, log = _finished_log(pod)
    assert phase == "Succeeded", log
    assert log.split() == ["1000", "1000", sys.prefix]


def test_a_volume_over_the_images_python_leaves_it_runnable(runner):
    """A checkout under /tmp (as CI may clone) with an emptyDir on /tmp, as learner pods have: the
    image's python and its packages stay visible, read-only, as files of a real image would be."""
    checkout = pathlib.Path(__file__).resolve().parents[2]
    pod = runner.start(make_pod("hidden", [{"name": "main", "command": python("""
        import medmo_trainer, pathlib
        print(pathlib.Path(medmo_trainer.__file__).parent.parent)
        try:
            pathlib.Path(medmo_trainer.__file__).with_name("written").write_text("x")
        except OSError as error:
            print(type(error).__name__)"""),
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
        "volumeMounts": [{"name": "over", "mountPath": str(checkout)}]}],
        volumes=[{"name": "over", "emptyDir": {}}]))
    phase, log = _finished_log(pod)
    assert phase == "Succeeded", log
    imported_from, write = log.split()
    assert imported_from == str(checkout) and write in ("PermissionError", "OSError"), log


def test_the_environment_is_only_what_the_spec_and_a_runtime_give(runner, monkeypatch):
    monkeypatch.setenv("MEDMO_RUNNER_ONLY", "leaked")
    pod = runner.start(make_pod("env", [{"name": "main", "command": ["env"], "env": [{"name": "GIVEN", "value": "1"}],
                                         "securityContext": {"runAsUser": 4321}},
                                        {"name": "uname", "command": ["uname", "-n"]}]))
    phase, log = _finished_log(pod)
    assert phase == "Succeeded", log
    assert pod.log_path("uname").read_text() == "env\n"  # the kernel's hostname too, not only HOSTNAME
    env = dict(line.split("=", 1) for line in log.splitlines())
    assert env["GIVEN"] == "1" and env["HOME"] == "/" and env["HOSTNAME"] == "env"
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    network = {"LD_PRELOAD", "MEDMO_POD_IP", "MEDMO_POD_PORTS_DIR", "NSS_WRAPPER_HOSTS", "NSS_WRAPPER_HOSTNAME"}
    assert set(env) == {"GIVEN", "HOME", "HOSTNAME", "PATH"} | network
    assert all(" " not in value and value.startswith("/run/") for value in
               (env["MEDMO_POD_PORTS_DIR"], env["NSS_WRAPPER_HOSTS"]))


def test_working_dir_is_honoured_and_defaults_to_the_root(runner):
    pod = runner.start(make_pod("cwd", [{"name": "there", "command": ["pwd"], "workingDir": "/srv/app"},
                                        {"name": "default", "command": ["pwd"]}]))
    assert pod.wait_finished(60) == "Succeeded"
    assert pod.log_path("there").read_text() == "/srv/app\n"
    assert pod.log_path("default").read_text() == "/\n"


def test_writes_outside_volumes_never_reach_the_host(runner, tmp_path):
    target = tmp_path / "from-the-pod"
    pod = runner.start(make_pod("scribbler", [{"name": "main", "command": ["sh", "-c", f"echo x > {target} && cat {target}"]}]))
    assert _finished_log(pod) == ("Succeeded", "x\n")  # the container saw its own write...
    assert not target.exists()  # ...in its own root, not the host's


RUNNER_SCRIPT = """
import sys, time, uuid
from medmo_operator.local import PodRunner, StaticObjects
runner = PodRunner(sys.argv[1], StaticObjects())
pod = runner.start({"metadata": {"name": "sleeper", "namespace": "ns", "uid": str(uuid.uuid4())},
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "command": ["sleep", "600"]}]}})
while not pod.command_pids():
    time.sleep(0.1)
print(pod.command_pids()["main"], flush=True)
time.sleep(600)
"""


def test_pod_processes_die_with_a_killed_runner(tmp_path):
    import subprocess

    runner = subprocess.Popen([sys.executable, "-c", RUNNER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        sleep = int(runner.stdout.readline())
        assert alive(sleep) and _command_line(sleep) == "sleep 600"
    finally:
        runner.kill()  # SIGKILL: no cleanup code of the runner runs
        runner.wait()
    wait_for(lambda: not alive(sleep), timeout_s=10, what="the pod's sleep to die with its runner")


def test_exec_readiness_probe_runs_inside_the_container_as_its_user(runner, tmp_path):
    # The marker exists only in the container's view (/srv is a volume), and only its user may read it.
    pod = runner.start(make_pod("exec-probe", [{"name": "main", "command": [
        "sh", "-c", "sleep 1; echo ok > /srv/ready; chmod 600 /srv/ready; exec sleep 600"],
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
        "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
        "readinessProbe": {"exec": {"command": ["sh", "-c", "test \"$(id -u)\" = 1000 && cat /srv/ready"]},
                           "periodSeconds": 0.2}}],
        restart_policy="Always", volumes=[{"name": "srv", "emptyDir": {}}]))
    wait_for(lambda: pod.status()["containerStatuses"][0]["state"].get("running"), what="the container running")
    assert not pod.status()["containerStatuses"][0]["ready"]
    wait_for(lambda: pod.status()["containerStatuses"][0]["ready"], what="the exec probe passing")
    assert not pathlib.Path("/srv/ready").exists()
